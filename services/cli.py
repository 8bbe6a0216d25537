"""The `flclustering` command.

`flclustering simulate` runs the federation as separate local processes over real gRPC;
`flclustering local` runs the same algorithm in one process, without the network.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.flags import OneLineParser, SettingsParser, add_log_flag, add_version_flag
from services.core.errors import ConfigError, FLClusteringError
from services.experiment import (
    EXPORT_GROUPS,
    INIT_MODEL_GROUPS,
    LOCAL_GROUPS,
    SIMULATE_GROUPS,
    CentralisedConfig,
    CompareConfig,
    ExperimentConfig,
    ExportConfig,
    InitModelConfig,
    SimulateConfig,
)

logger = logging.getLogger("flclustering")


def _progress(total: int, started: float) -> Any:
    def show(record: dict[str, Any]) -> None:
        done = record.get("model_version", record["round"] + 1)  # async: versions made
        width = 30
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        sys.stderr.write(
            f"\r[{bar}] round {done}/{total}  accuracy {record['mean_accuracy']:.3f}  "
            f"{time.perf_counter() - started:.0f}s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def run_local_command(config: ExperimentConfig) -> int:
    """`flclustering local`: run, print a summary table, write the results."""
    from services.local import run_local

    result = run_local(config, _progress(config.federation.rounds, time.perf_counter()))
    purity = result.clustering.get("purity") if result.clustering else None
    _summary(result.rounds, result.final, purity, _write_run(config, result), result.privacy)
    return 0


def _summary(
    rounds: list[dict[str, Any]],
    final: dict[str, Any],
    purity: float | None,
    where: Path,
    privacy: dict[str, Any] | None = None,
) -> None:
    private = any("epsilon" in r for r in rounds)
    eps = f" {'epsilon':>8}" if private else ""
    print(
        f"\n{'round':>5} {'accuracy':>9} {'loss':>7} {'std':>6} {'worst':>6} {'rejected':>8}{eps}"
    )
    step = max(1, len(rounds) // 10)
    shown = rounds[::step]
    if shown[-1] is not rounds[-1]:
        shown.append(rounds[-1])
    for r in shown:
        print(
            f"{r['round']:>5} {r['mean_accuracy']:>9.3f} {r['mean_loss']:>7.3f} "
            f"{r['accuracy_std']:>6.3f} {r['worst_accuracy']:>6.3f} {r['rejected']:>8}"
            + (f" {r['epsilon']:>8.3f}" if private and "epsilon" in r else "")
        )
    if purity is not None:
        print(f"clustering purity against the true groups: {purity:.2f}")
    if "clock_s" in rounds[-1]:  # local runs: simulated devices on the virtual clock
        counts = {
            key: sum(r.get(key) or 0 for r in rounds) for key in ("dropouts", "stragglers", "stale")
        }
        print(
            f"virtual clock {rounds[-1]['clock_s']:.2f}s; tasks dropped {counts['dropouts']}, "
            f"stragglers {counts['stragglers']}, stale updates refused {counts['stale']}"
        )
    extra = ""
    if "worst_group_accuracy" in final:
        extra += f", worst group {final['worst_group_accuracy']:.3f}"
    if "backdoor_success_rate" in final:
        extra += f", backdoor success rate {final['backdoor_success_rate']:.3f}"
    print(
        f"final: mean accuracy {final['mean_accuracy']:.3f}, std {final['accuracy_std']:.3f}, "
        f"worst {final['worst_accuracy']:.3f}{extra}; results in {where}"
    )
    if privacy:
        print(
            f"differential privacy ({privacy['mode']}): epsilon {privacy['epsilon']:.3f} at "
            f"delta {privacy['delta']:g} after {privacy['rounds']} rounds"
            + (f"; {privacy['stopped']}" if privacy.get("stopped") else "")
        )
    if "personal_mean_accuracy" in final:
        group = final.get("personal_worst_group_accuracy")
        print(
            f"per-cluster models (what participants serve): mean accuracy "
            f"{final['personal_mean_accuracy']:.3f}, std {final['personal_accuracy_std']:.3f}, "
            f"worst {final['personal_worst_accuracy']:.3f}"
            + ("" if group is None else f", worst group {group:.3f}")
        )


def _serve_until_interrupted() -> None:
    """Keep the federation's services up (for dashboards) until Ctrl-C or SIGTERM."""
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    sys.stderr.write("results written; services keep serving (Ctrl-C stops them)\n")
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()


def run_simulate_command(config: SimulateConfig) -> int:
    """`flclustering simulate`: the federation as local processes over gRPC."""
    from services.simulate import simulate

    started = time.perf_counter()
    show = _progress(config.federation.rounds, started)
    serve = _serve_until_interrupted if config.hosting.serve else None
    results = simulate(config, lambda record, _total: show(record), serve=serve)
    where = Path(config.run.out)
    purity = results["clustering"]["purity"]
    _summary(results["rounds"], results["final"], purity, where, results.get("privacy"))
    if results.get("processes"):
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in results["processes"].items())
        print(f"peak memory (MB): {peaks}")
    print(f"took {time.perf_counter() - started:.0f}s")
    return 0


def _write_run(config: ExperimentConfig, result: Any) -> Path:
    """results.json, rounds.csv, figures and the model file of an in-process run."""
    from services.common.report import write_run

    _, written = write_run(Path(config.run.out), result)
    return written[0].parent


def run_centralised_command(config: ExperimentConfig) -> int:
    """`flclustering centralised`: the pooled-data baseline, written like a run."""
    from services.centralised import run_centralised

    result = run_centralised(config, _progress(config.federation.rounds, time.perf_counter()))
    _summary(result.rounds, result.final, None, _write_run(config, result))
    return 0


def run_compare_command(config: ExperimentConfig, args: argparse.Namespace) -> int:
    """`flclustering compare`: strategies side by side, one table and one figure."""
    from services.compare import CENTRALISED, compare, markdown, table_rows
    from services.core.errors import ConfigError
    from services.core.strategies import STRATEGIES

    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(
            f"--strategies: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(STRATEGIES)}"
        )
    if args.centralised:
        strategies.append(CENTRALISED)
    seeds = args.seeds or [config.federation.seed]

    def done(strategy: str, seed: int, results: dict[str, Any]) -> None:
        print(f"{strategy} seed {seed}: mean accuracy {results['final']['mean_accuracy']:.3f}")

    runs = compare(config, strategies, seeds, args.over, done)
    print()
    print(markdown(table_rows(runs)), end="")
    out = Path(config.run.out)
    print(f"wrote compare.csv, compare.md, compare.png and runs/ to {out}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds) or len(seeds) > 100:
        raise argparse.ArgumentTypeError("1-100 seeds, each in [0, 2^32)")
    return seeds


def run_config_command(args: argparse.Namespace) -> int:
    """`flclustering config`: a command's defaults as a run file (`--config FILE`)."""
    import json

    from services.common.flags import defaults_document

    config, groups = (
        (SimulateConfig, SIMULATE_GROUPS)
        if args.for_command == "simulate"
        else (ExperimentConfig, LOCAL_GROUPS)
    )
    document = defaults_document(config, groups)
    if args.format == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(document, sort_keys=False))
    else:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    return 0


def run_predict_command(args: argparse.Namespace) -> int:
    """`flclustering predict`: read each image's symbols with a run's saved model."""
    import json

    from services.core.model_file import load_model_file
    from services.predict import describe, read_image, read_symbols

    model, card = load_model_file(args.model_file)
    reports = []
    for path in args.images:
        report = {"image": str(path), **describe(card, read_symbols(model, card, read_image(path)))}
        reports.append(report)
        if not args.json:
            probs = " ".join(f"{s['probability']:.2f}" for s in report["symbols"])
            line = f"{path}: {report['text'] or '(no symbol found)'}"
            if report["symbols"]:
                line += f"  (probabilities {probs})"
            if report.get("value") is not None:
                line += f"  = {report['value']:g}"
            print(line)
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def run_export_command(config: ExportConfig, args: argparse.Namespace) -> int:
    """`flclustering export`: the running aggregator's newest model as a model file."""
    from services.export import export_model

    version, paths = export_model(config, args.aggregator, args.identity, args.tls_server_name)
    print(f"wrote version {version} of the global model: {', '.join(str(p) for p in paths)}")
    return 0


def run_init_model_command(config: InitModelConfig) -> int:
    """Write w0 of the configured model as model.safetensors + model.json."""
    from services.initmodel import init_model  # torch, and the user's factory

    for path in init_model(config):
        print(path)
    return 0


def run_new_command(args: argparse.Namespace) -> int:
    """`flclustering new DIR`: a task package to edit (model factory, run file, README)."""
    from services.scaffold import write_scaffold

    for path in write_scaffold(args.directory, args.force):
        print(path)
    print(f"next: cd {args.directory} and follow README.md")
    return 0


def run_scrape_config_command(args: argparse.Namespace) -> int:
    """`flclustering scrape-config`: Prometheus configuration for a running simulation."""
    import json

    from services.core.errors import ConfigError
    from services.simulate import scrape_config

    try:
        endpoints = json.loads(args.endpoints.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {args.endpoints}: run flclustering simulate --serve first"
        ) from exc
    sys.stdout.write(scrape_config(endpoints, args.rules, args.interval))
    return 0


def run_certs_command(args: argparse.Namespace) -> int:
    """`flclustering certs`: a startup kit of certificates (CA, services, participants)."""
    from services.transport.credentials import Authority, participant_id, write_kit

    ids = [participant_id(i) for i in range(args.participants)] + list(args.participant)
    authority = Authority.load(args.ca_dir) if args.ca_dir else None
    write_kit(
        args.out,
        ids,
        {"clusterer": args.clusterer_dns, "aggregator": args.aggregator_dns},
        args.operator,
        authority,
    )
    print(
        f"wrote ca.crt, aggregator, clusterer, {len(args.operator)} operator(s) and "
        f"{len(ids)} participant certificate(s) to {args.out} (keys mode 0600; give each "
        "party only its own NAME.key, keep ca.key offline)"
    )
    return 0


def run_he_keys_command(args: argparse.Namespace) -> int:
    """`flclustering he-keys`: a CKKS key pair for --secure he."""
    from services.common.homomorphic import write_keys
    from services.core.ckks import PUBLIC_FILE, SECRET_FILE

    for name in (SECRET_FILE, PUBLIC_FILE):
        if (args.out / name).exists() and not args.force:
            raise ConfigError(f"{args.out / name} exists: keep it, or pass --force for new keys")
    try:
        secret, public, keys = write_keys(args.out)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: {exc.strerror or exc}") from None
    print(
        f"wrote {secret} (mode 0600: give it to every participant, and an operator who "
        f"exports the model) and {public} (the aggregator's: it adds ciphertexts, it cannot "
        f"decrypt); key {keys.short()}"
    )
    return 0


def run_tokens_command(args: argparse.Namespace) -> int:
    """`flclustering tokens`: per-participant tokens and the digests the clusterer keeps."""
    from services.transport.credentials import participant_id, write_tokens

    ids = [participant_id(i) for i in range(args.participants)] + list(args.participant)
    digests = write_tokens(args.out, ids)
    print(
        f"wrote {len(ids)} token file(s) NAME.token and {digests.name} to {args.out}: give "
        f"each edge participant its own token (--auth-token-file) and the clusterer "
        f"--participant-tokens {digests}"
    )
    return 0


def _identity_flags(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path(out), help=f"directory to write into (default: {out})"
    )
    parser.add_argument(
        "--participants",
        type=_count,
        default=0,
        help="participants participant-00000.. to make (default: 0)",
    )
    parser.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="ID",
        help="a further participant by id (repeatable) (default: none)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be in [0, 1000000]")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, SettingsParser]]:
    """The `flclustering` parser, and the settings parser of each experiment sub-command."""
    parser = OneLineParser(prog="flclustering", description=__doc__)
    add_version_flag(parser)
    add_log_flag(parser, "WARNING")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sim = sub.add_parser(
        "simulate",
        help="run the federation as local processes over gRPC (the main job)",
        description="Run the federation as local processes over real gRPC.",
    )
    local = sub.add_parser(
        "local",
        help="run the same algorithm in one process, no network",
        description="Run the same algorithm in one process, without the network.",
    )
    centralised = sub.add_parser(
        "centralised",
        help="the baseline: the same model, data and budget on pooled data",
        description="Train the same model on the pooled training data of every participant, "
        "with the federation's budget of examples per round, and evaluate it on every "
        "participant's test split after each round; written like a run.",
    )
    comparing = sub.add_parser(
        "compare",
        help="run several strategies (and the centralised baseline): one table, one figure",
        description="Run each strategy (and with --centralised the pooled-data baseline) "
        "with the same settings and seeds; write compare.csv, compare.md, compare.png and "
        "each run under OUT/runs/.",
    )
    exporting = sub.add_parser(
        "export",
        help="write a running aggregator's newest model as model.safetensors + model.json",
        description="Fetch the newest global model from a running aggregator (as an "
        "operator: --tls-dir with the operator's certificate) and write model.safetensors "
        "and model.json into --out, the normalisation and classes taken from --dataset "
        "here; for federations started as services (by hand, on Kubernetes).",
    )
    initialising = sub.add_parser(
        "init-model",
        help="write the starting weights (w0) of a model, a user's factory included",
        description="Build --model (a built-in or a user's package.module:factory, imported "
        "here) with --seed for the declared sample (--dataset own and its sample settings, "
        "or a named dataset) and write model.safetensors and model.json into --out; start "
        "the aggregator with --initial-model OUT/model.safetensors (it never imports the "
        "factory) and the participants with the same --model and --seed.",
    )
    new = sub.add_parser(
        "new",
        help="write a task package to edit: a model factory, a run file for own data, a README",
        description="Write DIR/task/__init__.py (a model factory, make(input_shape, outputs)), "
        "DIR/run.yaml (a run file: --dataset own, --model task:make, three participants, "
        "what a sample is), DIR/example_data.py (folders of digits to try it on) and "
        "DIR/README.md (the commands from the TLS kit and init-model to the participants).",
    )
    new.add_argument("directory", type=Path, metavar="DIR", help="where to write (made if missing)")
    new.add_argument(
        "--force",
        action="store_true",
        help="write into an existing non-empty DIR, replacing files of the same names "
        "(default: refuse)",
    )
    settings = {
        "init-model": SettingsParser(initialising, InitModelConfig, INIT_MODEL_GROUPS),
        "export": SettingsParser(exporting, ExportConfig, EXPORT_GROUPS),
        "simulate": SettingsParser(sim, SimulateConfig, SIMULATE_GROUPS),
        "local": SettingsParser(local, ExperimentConfig, LOCAL_GROUPS),
        "centralised": SettingsParser(centralised, CentralisedConfig, LOCAL_GROUPS),
        "compare": SettingsParser(comparing, CompareConfig, LOCAL_GROUPS),
    }
    exporting.add_argument(
        "--aggregator",
        default=os.environ.get("AGGREGATOR_ADDR", "127.0.0.1:50052"),
        help="host:port of the aggregator (default: 127.0.0.1:50052; env AGGREGATOR_ADDR)",
    )
    exporting.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="the name the aggregator's certificate carries, when --aggregator is another "
        "(a port-forward's localhost: aggregator) (default: the --aggregator host)",
    )
    exporting.add_argument(
        "--identity",
        default="operator",
        metavar="NAME",
        help="whose certificate in --tls-dir to call with (NAME.crt/NAME.key) (default: operator)",
    )
    comparing.add_argument(
        "--strategies",
        default="fedavg,flclustering",
        help="comma-separated strategies (default: fedavg,flclustering)",
    )
    comparing.add_argument(
        "--centralised",
        action="store_true",
        help="add the centralised baseline (pooled data) to the table (default: off)",
    )
    comparing.add_argument(
        "--seeds", type=_seeds, default=None, help="comma-separated seeds (default: --seed)"
    )
    comparing.add_argument(
        "--over",
        choices=("local", "grpc"),
        default="local",
        help="in one process (local) or as services over gRPC (simulate) (default: local)",
    )
    config = sub.add_parser(
        "config",
        help="print the defaults as a run file (edit it, pass it with --config FILE)",
        description="Print a command's settings with their defaults as a run file: edit "
        "it and run `flclustering simulate --config FILE` (flags still override it). A "
        "finished run's results.json is a run file too.",
    )
    config.add_argument(
        "for_command",
        nargs="?",
        choices=("simulate", "local"),
        default="simulate",
        help="the command whose settings to print (default: simulate)",
    )
    config.add_argument(
        "--format",
        choices=("json", "yaml"),
        default="json",
        help="output format: json, or yaml (default: json)",
    )
    predict = sub.add_parser(
        "predict",
        help="read the symbols of images with a run's saved model",
        description="Classify images with a run's model.safetensors (and model.json beside "
        "it). An image holding several handwritten symbols is cut into them (connected "
        "components of the ink) and read left to right; with operator classes the "
        "expression's value is printed too.",
    )
    predict.add_argument(
        "--model-file",
        type=Path,
        default=Path("runs/simulate/model.safetensors"),
        help="the model.safetensors of a run, or its directory "
        "(default: runs/simulate/model.safetensors)",
    )
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG or JPEG")
    predict.add_argument(
        "--json",
        action="store_true",
        help="print JSON for programs instead of a line per image (default: off)",
    )
    scrape = sub.add_parser(
        "scrape-config",
        help="print a Prometheus config scraping a simulation's services",
        description="Print a Prometheus configuration scraping a running simulation.",
    )
    scrape.add_argument(
        "endpoints",
        type=Path,
        nargs="?",
        default=Path("runs/simulate/endpoints.json"),
        help="endpoints.json of a simulation (default: runs/simulate/endpoints.json)",
    )
    scrape.add_argument(
        "--rules",
        help="alerting rules file to load, e.g. deploy/prometheus/alerts.yml (default: none)",
    )
    scrape.add_argument("--interval", default="5s", help="scrape interval (default: 5s)")
    certs = sub.add_parser(
        "certs",
        help="make mutual-TLS certificates: a CA, the services, operators, participants",
        description="Make a startup kit: ca.crt/ca.key and NAME.crt/NAME.key for the "
        "aggregator, the clusterer, each operator and each participant. Each certificate "
        "names its party (spiffe://flclustering/ROLE/NAME); servers take a caller's id "
        "from it.",
    )
    _identity_flags(certs, "credentials")
    certs.add_argument(
        "--operator",
        action="append",
        default=None,
        metavar="NAME",
        help="operator identities: they read status and export the global model "
        "(repeatable) (default: operator)",
    )
    certs.add_argument(
        "--clusterer-dns",
        action="append",
        default=[],
        metavar="NAME",
        help="further DNS names of the clusterer, beside clusterer and localhost (default: none)",
    )
    certs.add_argument(
        "--aggregator-dns",
        action="append",
        default=[],
        metavar="NAME",
        help="further DNS names of the aggregator, beside aggregator and localhost (default: none)",
    )
    certs.add_argument(
        "--ca-dir",
        type=Path,
        help="issue from the CA in this directory (ca.crt, ca.key) instead of a new one "
        "(default: a new CA)",
    )
    tokens = sub.add_parser(
        "tokens",
        help="make per-participant tokens for edge devices (the clusterer keeps hashes)",
        description="Make one token per participant (NAME.token) and tokens.sha256.json, "
        "the digests the clusterer checks them against (--participant-tokens).",
    )
    _identity_flags(tokens, "tokens")
    he_keys = sub.add_parser(
        "he-keys",
        help="make the CKKS key pair of --secure he (participants: secret, aggregator: public)",
        description="Write he-secret.ctx (the secret key, for participants) and "
        "he-public.ctx (the public context, for the aggregator) to --out.",
    )
    he_keys.add_argument(
        "--out", type=Path, default=Path("credentials"), help="directory (default: credentials)"
    )
    he_keys.add_argument(
        "--force", action="store_true", help="replace existing key files (default: refuse)"
    )
    return parser, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flclustering` console script."""
    parser, settings = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "scrape-config":
            return run_scrape_config_command(args)
        if args.command == "config":
            return run_config_command(args)
        if args.command == "predict":
            return run_predict_command(args)
        if args.command == "certs":
            args.operator = args.operator or ["operator"]
            return run_certs_command(args)
        if args.command == "tokens":
            return run_tokens_command(args)
        if args.command == "he-keys":
            return run_he_keys_command(args)
        if args.command == "new":
            return run_new_command(args)
        config = settings[args.command].from_namespace(args)
        if args.command == "export":
            return run_export_command(config, args)
        if args.command == "init-model":
            return run_init_model_command(config)
        if args.command == "simulate":
            return run_simulate_command(config)
        if args.command == "centralised":
            return run_centralised_command(config)
        if args.command == "compare":
            return run_compare_command(config, args)
        return run_local_command(config)
    except FLClusteringError as exc:
        sys.stderr.write(f"flclustering: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("flclustering: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
