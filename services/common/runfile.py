"""Reading a run file (`--config FILE`) within limits, before anything is built from it.

A run file is a few settings groups two or three levels deep (a results.json four); what
it may not do is cost the command reading it more than a moment and a little memory. So,
checked before a single Python object is made from the text:

- at most MAX_BYTES (stat before reading, and never more than MAX_BYTES + 1 bytes read).
  A longer results.json (a long run's rounds; all writers put "config" first, then
  "rounds") is read as far as its config block, which is all of it a run needs;
- nested at most MAX_DEPTH deep: JSON by a scan of its brackets outside strings, YAML by
  counting the parser's collection events (both linear and without recursion; the loaders
  recurse, so a file 100,000 deep would otherwise end in a RecursionError after a while);
- YAML: no anchors and no aliases, and at most MAX_YAML_VALUES values. A run file never
  needs an alias, and an alias is a reference: nine levels of nine aliases each are a few
  hundred bytes that expand, as soon as anything walks them, into 9^10 values (gigabytes).
  The events are checked as they stream, and the document is built (safe_load: plain
  data only) only once they pass.

A refusal is a RunFileError whose text is one line without the file's name (the caller
names the file); an unreadable file is the OSError of opening or reading it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

MAX_BYTES = 1 << 20  # 1 MiB: run files are a few KiB, results.json ~1.2 KiB a round
MAX_DEPTH = 32  # run files are 2-3 deep, a results.json 4
# YAML only: values (scalars and collections) in the file. Each costs PyYAML a node and a
# constructor call (~7 us with libyaml, ~40 us without: 1 MiB of "[1,1,...]" took 3.7 s
# and 190 MB to load); a run file has a few hundred. JSON's loader is fast enough that
# MAX_BYTES bounds it (1 MiB of any JSON: ~0.2 s, ~20 MB).
MAX_YAML_VALUES = 10_000
MAX_SCALAR = 4096  # characters of one YAML value (a path, a token file's name)
MAX_INT_BITS = 64  # an integer setting past this is no setting (rounds, seeds, sizes)

# A JSON string (escapes included; an unterminated one runs to the end: the scan stays
# linear and json.loads reports it), or one bracket.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
# How a results.json starts, and what follows its config block.
_RESULTS_START = re.compile(r'\s*\{\s*"config"\s*:\s*')
_RESULTS_NEXT = re.compile(r'\s*,\s*"rounds"\s*:')


class RunFileError(ValueError):
    """A run file refused: its one-line reason, without the file's name."""


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text[: limit * 4].split())[:limit]


def _decode(raw: bytes, cut: bool) -> str:
    """UTF-8 bytes as text; cut: they end at an arbitrary byte (a character may be split)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.end == len(raw) and exc.start >= len(raw) - 3:
            return raw[: exc.start].decode("utf-8")
        raise RunFileError(f"not UTF-8 text (byte {exc.start:,})") from None


def read_text(path: str, max_bytes: int = MAX_BYTES) -> tuple[str, bool]:
    """The file's text, at most max_bytes of it, and whether that is all of it."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(max_bytes + 1)  # a pipe or a growing file has no honest size
    whole = size <= max_bytes and len(raw) <= max_bytes
    return _decode(raw[:max_bytes], cut=not whole), whole


def _too_large(max_bytes: int) -> RunFileError:
    return RunFileError(f"larger than a run file's limit of {max_bytes:,} bytes")


def json_depth_error(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """Why text nests deeper than max_depth (brackets outside strings), else None."""
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        first = match.group()[0]
        if first == "[" or first == "{":
            depth += 1
            if depth > max_depth:
                line = text.count("\n", 0, match.start()) + 1
                return f"nested deeper than {max_depth} levels (line {line})"
        elif first == "]" or first == "}":
            depth -= 1
    return None


def load_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text as Python data, within the depth limit."""
    reason = json_depth_error(text, max_depth)
    if reason:
        raise RunFileError(reason)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: not with the scan above
        raise RunFileError(f"not JSON ({_one_line(str(exc))})") from None


def results_config(head: str, max_depth: int = MAX_DEPTH) -> dict[str, Any] | None:
    """The config block of a results.json from the start of its text (the rest unread),
    or None when the text does not start like a results.json or its block is cut off."""
    start = _RESULTS_START.match(head)
    if start is None:
        return None
    reason = json_depth_error(head, max_depth)
    if reason:
        raise RunFileError(reason)
    try:
        config, end = json.JSONDecoder().raw_decode(head, start.end())
    except ValueError:
        return None
    if not isinstance(config, dict) or _RESULTS_NEXT.match(head, end) is None:
        return None
    return config


def _safe_loader() -> type[Any]:
    import yaml  # only a YAML run file needs it

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when it is built in


def yaml_events_error(
    text: str, max_depth: int = MAX_DEPTH, max_values: int = MAX_YAML_VALUES
) -> str | None:
    """Why YAML text may not be loaded (an anchor, an alias, deeper than max_depth, more
    than max_values values), from its parser's events as they stream (no document built),
    else None; malformed YAML raises the parser's YAMLError."""
    import yaml

    refused = "YAML anchors and aliases are not allowed in a run file"
    depth = values = 0
    events = yaml.parse(text, Loader=_safe_loader())
    try:
        for event in events:
            line = event.start_mark.line + 1 if event.start_mark is not None else 0
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent):
                return f"{refused} (*{str(anchor)[:40]} at line {line})"
            if anchor is not None:
                return f"{refused} (&{str(anchor)[:40]} at line {line})"
            if isinstance(event, yaml.NodeEvent):  # a scalar, or a collection's start
                values += 1
                if values > max_values:
                    return f"more than {max_values:,} values (line {line})"
            if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR:
                # A scalar's constructor can cost more than its size (a base-60 or hex
                # integer of a megabyte is built digit by digit into a huge int).
                return f"a value longer than {MAX_SCALAR:,} characters (line {line})"
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    return f"nested deeper than {max_depth} levels (line {line})"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as exc:
        # libyaml >= 0.2.5 stops at 1,000 levels, met while it looks ahead for a key
        # before the first event: the same refusal as ours.
        if "nesting depth" not in str(exc.problem):
            raise
        mark = exc.problem_mark
        return f"nested deeper than {max_depth} levels (line {mark.line + 1 if mark else 1})"
    return None


def load_yaml(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """YAML text as plain Python data (safe_load), once its events pass the checks."""
    import yaml

    try:
        reason = yaml_events_error(text, max_depth)
        if reason is None:
            # Plain data only, never arbitrary Python objects.
            return yaml.load(text, Loader=_safe_loader())
    except yaml.YAMLError as exc:
        raise RunFileError(f"not YAML ({_one_line(str(exc))})") from None
    except Exception as exc:  # a constructor's on a bad tagged value (!!int "", !!bool x)
        raise RunFileError(f"not YAML ({type(exc).__name__}: {_one_line(str(exc))})") from None
    raise RunFileError(reason)


def is_yaml(path: str) -> bool:
    """Whether a run file is read as YAML (by its name), else as JSON."""
    return path.lower().endswith((".yaml", ".yml"))


def load_run_file(path: str, max_bytes: int = MAX_BYTES) -> Any:
    """A run file's settings (JSON, or YAML when named .yaml/.yml; a results.json: its
    config block), within the limits."""
    text, whole = read_text(path, max_bytes)
    if is_yaml(path):
        if not whole:
            raise _too_large(max_bytes)
        data = load_yaml(text)
    elif not whole:
        config = results_config(text)
        if config is None:
            raise _too_large(max_bytes)
        return config
    else:
        data = load_json(text)
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "rounds" in data:
        data = data["config"]  # a finished run's results.json: the settings it ran with
    huge = _huge_int(data)
    if huge is not None:
        raise RunFileError(f"{huge}: an integer of more than {MAX_INT_BITS} bits")
    return data


def _huge_int(data: Any, where: str = "", depth: int = 0) -> str | None:
    """Where the first integer past MAX_INT_BITS sits in settings groups (their fields are
    checked; deeper values are the groups' own business), or None."""
    if isinstance(data, bool):
        return None
    if isinstance(data, int) and data.bit_length() > MAX_INT_BITS:
        return where or "the file"
    if isinstance(data, dict) and depth < 3:
        for k, v in data.items():
            found = _huge_int(v, f"{where}.{str(k)[:40]}".lstrip("."), depth + 1)
            if found:
                return found
    if isinstance(data, list) and depth < 3:
        for i, v in enumerate(data[:MAX_YAML_VALUES]):
            found = _huge_int(v, f"{where}[{i}]", depth + 1)
            if found:
                return found
    return None
