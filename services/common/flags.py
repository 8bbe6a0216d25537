"""Command lines built from settings groups: flags, help, environment and settings files.

Every flag is generated from a settings field (services.common.settings): `--kebab-name`,
its description as help with the default and the environment variable shown, its choices
from the field's registry. Values are read, lowest precedence first, from the defaults, a
run file (`--config FILE`, alias `--settings`: JSON or YAML, settings groups as objects;
`flclustering config` prints one; a results.json counts as its `config` block, so a
finished run is re-run from its own results), environment variables, then flags; pydantic
validates the result once, and a bad value is one line naming the flag (or variable, or
file entry) it came from.

Why not jsonargparse or pydantic-settings: both derive one environment prefix per parser
from the field names, but the deployed names are shared across services by group
(FLCLUSTERING_ROUNDS in one ConfigMap for all three) and per service for the rest
(CLUSTERER_PORT, AGGREGATOR_PORT); and both print multi-line usage errors. Generating
argparse flags from pydantic fields is this one small module.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from services.common.runfile import RunFileError, load_run_file
from services.common.settings import Choice, Settings, cut, env_name, flag_of, one_line
from services.common.version import describe

SETTINGS_ENV = "FLCLUSTERING_SETTINGS"
# Every group any command has; a settings file may carry any of them (each command takes
# its own), and nothing else.
SETTINGS_GROUPS = frozenset(
    {
        "service",
        "transport",
        "federation",
        "training",
        "defence",
        "data",
        "adversary",
        "participant",
        "clustering",
        "store",
        "compute",
        "sample",
        "run",
        "hosting",
        "privacy",
        "pace",
        "devices",
    }
)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _VersionAction(argparse.Action):
    """--version, worked out only when asked (it may run git): print it and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(describe())  # on stdout, as argparse's own version action prints
        parser.exit(0)


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """--version: `flclustering 0.1.0`, with the source revision when known."""
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the release (and source revision, when known) and exit",
    )


@dataclass(frozen=True)
class Group:
    """A settings group of a command: its field in the config, env prefix, exposed fields."""

    key: str
    env_prefix: str = "FLCLUSTERING_"
    only: tuple[str, ...] | None = None  # None: every field is a flag


def _choices(info: FieldInfo) -> tuple[str, ...] | None:
    for meta in info.metadata:
        func = getattr(meta, "func", None)
        if isinstance(func, Choice):
            return func.names
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


class SettingsParser:
    """The flags of one command's config (a Settings model whose fields are groups)."""

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        config: type[Settings],
        groups: Sequence[Group],
    ) -> None:
        self.parser = parser
        self.config = config
        self.defaults = config()
        self.fields: dict[str, tuple[str, str, str]] = {}  # dest -> (group, field, env)
        parser.add_argument(
            "--config",
            "--settings",
            dest="settings",
            default=os.environ.get(SETTINGS_ENV) or None,
            metavar="FILE",
            help="read settings from this run file (JSON, or YAML when named .yaml/.yml; "
            "`flclustering config` prints the defaults as one; a results.json is read as its "
            "config block); environment variables and flags override it "
            f"(default: none; env {SETTINGS_ENV})",
        )
        for group in groups:
            assert group.key in SETTINGS_GROUPS, group.key
            model = self._group_model(group.key)
            current = getattr(self.defaults, group.key)
            title = (model.__doc__ or group.key).strip().splitlines()[0]
            section = parser.add_argument_group(f"{group.key} settings", title)
            for name, info in model.model_fields.items():
                if group.only is not None and name not in group.only:
                    continue
                if name in self.fields:
                    raise AssertionError(f"setting {name} is declared by two groups")
                env = env_name(info) or group.env_prefix + name.upper()
                self.fields[name] = (group.key, name, env)
                choices = _choices(info)
                kwargs: dict[str, Any] = {
                    "dest": name,
                    "default": argparse.SUPPRESS,
                    "help": f"{info.description} (default: {_shown(getattr(current, name))};"
                    f" env {env})",
                }
                if choices:
                    kwargs["metavar"] = "{" + ",".join(choices) + "}"
                elif info.annotation is bool:
                    kwargs.update(nargs="?", const="true", metavar="{true,false}")
                elif info.annotation in (int, float):
                    kwargs["metavar"] = "N" if info.annotation is int else "X"
                else:
                    kwargs["metavar"] = name.split("_")[-1].upper()
                section.add_argument(flag_of(name), **kwargs)

    def env_names(self) -> set[str]:
        """Every environment variable this command reads."""
        return {env for _, _, env in self.fields.values()} | {SETTINGS_ENV}

    @classmethod
    def command(
        cls, prog: str, description: str | None, config: type[Settings], groups: Sequence[Group]
    ) -> SettingsParser:
        """The settings parser of a whole command (its own one-line-error parser)."""
        parser = OneLineParser(prog=prog, description=description)
        add_version_flag(parser)
        return cls(parser, config, groups)

    def _group_model(self, key: str) -> type[Settings]:
        annotation = self.config.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, Settings)):
            raise AssertionError(f"{self.config.__name__}.{key} is not a settings group")
        return annotation

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """Parse argv (and the environment, and --settings) into the config; exit 2 on error."""
        ns = self.parser.parse_args(argv)
        return self.from_namespace(ns)

    def from_namespace(self, ns: argparse.Namespace) -> Any:
        """The config from parsed flags, the environment and the settings file."""
        data: dict[str, Any] = self.defaults.model_dump()
        source: dict[tuple[str, str], str] = {}
        if getattr(ns, "settings", None):
            for key, values in read_settings_file(self.parser, ns.settings).items():
                if key not in SETTINGS_GROUPS or not isinstance(values, Mapping):
                    self.parser.error(
                        f"--config {ns.settings}: {cut(key)!r} is not a settings group "
                        f"({', '.join(sorted(SETTINGS_GROUPS))})"
                    )
                if key in data:  # a file shared by all services: each takes its groups
                    known = self._group_model(key).model_fields
                    for field in values:
                        if not isinstance(field, str) or field not in known:
                            # Here, not by pydantic: one line for the first, however many.
                            self.parser.error(
                                f"--config {ns.settings}: {cut(field)!r} is not a setting "
                                f"of the {key} group"
                            )
                        source[(key, field)] = f"{ns.settings}: {key}.{field}"
                    data[key] = {**data[key], **values}
        for name, (key, field, env) in self.fields.items():
            raw = os.environ.get(env)
            if raw not in (None, ""):
                data[key][field] = raw
                source[(key, field)] = env
            if name in ns:
                data[key][field] = getattr(ns, name)
                source[(key, field)] = flag_of(name)
        try:
            return self.config.model_validate(data)
        except ValidationError as exc:
            self.parser.error(self._describe(exc, source))

    def _describe(self, exc: ValidationError, source: dict[tuple[str, str], str]) -> str:
        """The errors as one line naming where each bad value came from (a flag, a
        variable, the run file's entry)."""

        def where(loc: tuple[str, ...]) -> str:
            if len(loc) < 2:
                return ".".join(loc)
            named = flag_of(loc[1]) if loc[1] in self.fields else cut(".".join(loc), 80)
            return source.get((loc[0], loc[1]), named)

        return one_line(exc, where)


def read_settings_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """An object of settings groups from a JSON or YAML run file (a results.json: its
    config block); a missing, malformed or oversized file, or one nested too deep or (YAML)
    with anchors or aliases, is one parser error (services.common.runfile: the limits)."""
    try:
        data = load_run_file(path)
    except OSError as exc:
        parser.error(f"--config {path}: {exc.strerror or cut(str(exc), 200)}")
    except RunFileError as exc:
        parser.error(f"--config {path}: {exc}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected an object of settings groups")
    return data


def defaults_document(config: type[Settings], groups: Sequence[Group]) -> dict[str, Any]:
    """A command's defaults as a run file's content: its groups' settings that are flags,
    as JSON values (a group's other fields, secrets among them, stay out)."""
    dumped = config().model_dump(mode="json")
    return {
        g.key: {k: v for k, v in dumped[g.key].items() if g.only is None or k in g.only}
        for g in groups
    }


def write_settings_file(path: str | os.PathLike[str], groups: Mapping[str, Settings]) -> None:
    """Write settings groups as the JSON a `--settings` flag reads."""
    payload = {key: value.model_dump(mode="json") for key, value in groups.items()}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")


def add_log_flag(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """--log-level, for commands that have no service settings group."""
    env = "FLCLUSTERING_LOG_LEVEL"
    parser.add_argument(
        "--log-level",
        default=os.environ.get(env) or default,
        help=f"log level (default: {default}; env {env})",
    )
