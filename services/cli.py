"""The `flclustering` command.

`flclustering simulate` runs the federation as separate local processes over real gRPC;
`flclustering local` runs the same algorithm in one process, without the network.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from services.common.errors import FLClusteringError
from services.common.flags import OneLineParser, env, optional_int, parse_bool
from services.common.strategies import STRATEGIES

logger = logging.getLogger("flclustering")


def _add_run_flags(p: argparse.ArgumentParser, out: str) -> None:
    from services.common.local_run import RunConfig
    from services.participant.attacks import ATTACKS
    from services.participant.datasets import DATASETS
    from services.participant.models import MODELS
    from services.participant.partition import PARTITIONS

    d = RunConfig()
    e = "FLCLUSTERING_"
    p.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default=env(e + "STRATEGY", d.strategy)
    )
    p.add_argument("--dataset", choices=DATASETS, default=env(e + "DATASET", d.dataset))
    p.add_argument("--data-dir", default=env(e + "DATA_DIR", d.data_dir))
    p.add_argument(
        "--download",
        type=parse_bool,
        default=env(e + "DOWNLOAD", d.download),
        help="download a missing dataset into --data-dir (true/false)",
    )
    p.add_argument("--partition", choices=PARTITIONS, default=env(e + "PARTITION", d.partition))
    p.add_argument("--participants", type=int, default=env(e + "PARTICIPANTS", d.participants))
    p.add_argument(
        "--groups",
        type=int,
        default=env(e + "GROUPS", d.groups),
        help="ground-truth label groups of practical-noniid",
    )
    p.add_argument(
        "--clusters",
        type=optional_int,
        default=env(e + "CLUSTERS", d.clusters, optional_int),
        help="k, or 'auto' to choose it from the deltas",
    )
    p.add_argument("--select", type=int, default=env(e + "SELECT", d.select))
    p.add_argument("--rounds", type=int, default=env(e + "ROUNDS", d.rounds))
    p.add_argument("--local-epochs", type=int, default=env(e + "LOCAL_EPOCHS", d.local_epochs))
    p.add_argument("--batch-size", type=int, default=env(e + "BATCH_SIZE", d.batch_size))
    p.add_argument("--lr", type=float, default=env(e + "LR", d.lr))
    p.add_argument("--momentum", type=float, default=env(e + "MOMENTUM", d.momentum))
    p.add_argument("--model", choices=sorted(MODELS), default=env(e + "MODEL", d.model))
    p.add_argument("--q", type=float, default=env(e + "Q", d.q))
    p.add_argument("--pre-steps", type=int, default=env(e + "PRE_STEPS", d.pre_steps))
    p.add_argument(
        "--adjusted",
        type=parse_bool,
        default=env(e + "ADJUSTED", d.adjusted),
        help="sample adjustment strategy for pre-training (true/false)",
    )
    p.add_argument(
        "--byzantine-fraction",
        type=float,
        default=env(e + "BYZANTINE_FRACTION", d.byzantine_fraction),
    )
    p.add_argument("--attack", choices=ATTACKS, default=env(e + "ATTACK", d.attack))
    p.add_argument("--attack-rate", type=float, default=env(e + "ATTACK_RATE", d.attack_rate))
    p.add_argument("--attack-factor", type=float, default=env(e + "ATTACK_FACTOR", d.attack_factor))
    p.add_argument("--attack-every", type=int, default=env(e + "ATTACK_EVERY", d.attack_every))
    p.add_argument(
        "--attack-placement",
        choices=("per-group", "random"),
        default=env(e + "ATTACK_PLACEMENT", d.attack_placement),
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=env(e + "ALPHA", d.alpha),
        help="Dirichlet concentration of the dirichlet partition",
    )
    p.add_argument("--seed", type=int, default=env(e + "SEED", d.seed))
    p.add_argument("--device", default=env(e + "DEVICE", "auto"), help="auto, cpu or cuda[:n]")
    p.add_argument("--out", type=Path, default=env(e + "OUT", Path(out)))


def _progress(total: int, started: float) -> Any:
    def show(record: dict[str, Any]) -> None:
        done = record["round"] + 1
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


def run_local_command(args: argparse.Namespace) -> int:
    """`flclustering local`: run, print a summary table, write the results."""
    from services.common.local_run import RunConfig, run_local
    from services.common.report import write_results

    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    config = RunConfig(**values)
    result = run_local(config, _progress(config.rounds, time.perf_counter()))
    payload = {
        "config": result.config,
        "rounds": result.rounds,
        "clusters": result.clusters,
        "clustering": result.clustering,
        "final": result.final,
    }
    written = write_results(args.out, payload)
    purity = result.clustering.get("purity") if result.clustering else None
    _summary(result.rounds, result.final, purity, written[0].parent)
    return 0


def _summary(
    rounds: list[dict[str, Any]], final: dict[str, float], purity: float | None, where: Path
) -> None:
    print(f"\n{'round':>5} {'accuracy':>9} {'loss':>7} {'std':>6} {'worst':>6} {'rejected':>8}")
    step = max(1, len(rounds) // 10)
    shown = rounds[::step]
    if shown[-1] is not rounds[-1]:
        shown.append(rounds[-1])
    for r in shown:
        print(
            f"{r['round']:>5} {r['mean_accuracy']:>9.3f} {r['mean_loss']:>7.3f} "
            f"{r['accuracy_std']:>6.3f} {r['worst_accuracy']:>6.3f} {r['rejected']:>8}"
        )
    if purity is not None:
        print(f"clustering purity against the true groups: {purity:.2f}")
    print(
        f"final: mean accuracy {final['mean_accuracy']:.3f}, std {final['accuracy_std']:.3f}, "
        f"worst {final['worst_accuracy']:.3f}; results in {where}"
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


def run_simulate_command(args: argparse.Namespace) -> int:
    """`flclustering simulate`: the federation as local processes over gRPC."""
    from services.common.local_run import RunConfig
    from services.simulate import SimulateConfig, simulate

    flags = vars(args)
    run = RunConfig(**{f.name: flags[f.name] for f in fields(RunConfig) if f.name in flags})
    hosting = {f.name: flags[f.name] for f in fields(SimulateConfig) if f.name in flags}
    config = SimulateConfig(run=run, **{**hosting, "out": str(hosting["out"])})
    started = time.perf_counter()
    show = _progress(config.run.rounds, started)
    serve = _serve_until_interrupted if args.serve else None
    results = simulate(config, lambda record, _total: show(record), serve=serve)
    _summary(results["rounds"], results["final"], results["clustering"]["purity"], Path(config.out))
    print(f"took {time.perf_counter() - started:.0f}s")
    return 0


def run_scrape_config_command(args: argparse.Namespace) -> int:
    """`flclustering scrape-config`: Prometheus configuration for a running simulation."""
    import json

    from services.common.errors import ConfigError
    from services.simulate import scrape_config

    try:
        endpoints = json.loads(args.endpoints.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {args.endpoints}: run flclustering simulate --serve first"
        ) from exc
    sys.stdout.write(scrape_config(endpoints, args.rules, args.interval))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `flclustering` parser with its sub-commands."""
    parser = OneLineParser(prog="flclustering", description=__doc__)
    parser.add_argument("--log-level", default=env("FLCLUSTERING_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sim = sub.add_parser(
        "simulate", help="run the federation as local processes over gRPC (the main job)"
    )
    _add_run_flags(sim, "runs/simulate")
    e = "FLCLUSTERING_"
    sim.add_argument(
        "--per-process",
        type=int,
        default=env(e + "PER_PROCESS", 10),
        help="participants hosted by each participant process",
    )
    sim.add_argument("--round-timeout-s", type=float, default=env(e + "ROUND_TIMEOUT_S", 120.0))
    sim.add_argument("--aggregator-port", type=int, default=env("AGGREGATOR_PORT", 0))
    sim.add_argument("--clusterer-port", type=int, default=env("CLUSTERER_PORT", 0))
    sim.add_argument(
        "--serve",
        action="store_true",
        help="keep the services up after the last round, until Ctrl-C",
    )
    sim.set_defaults(func=run_simulate_command)
    scrape = sub.add_parser(
        "scrape-config", help="print a Prometheus config scraping a simulation's services"
    )
    scrape.add_argument(
        "endpoints", type=Path, nargs="?", default=Path("runs/simulate/endpoints.json")
    )
    scrape.add_argument(
        "--rules", help="alerting rules file to load (deploy/prometheus/alerts.yml)"
    )
    scrape.add_argument("--interval", default="5s")
    scrape.set_defaults(func=run_scrape_config_command)
    local = sub.add_parser("local", help="run the same algorithm in one process, no network")
    _add_run_flags(local, "runs/local")
    local.set_defaults(func=run_local_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flclustering` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FLClusteringError as exc:
        sys.stderr.write(f"flclustering: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("flclustering: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
