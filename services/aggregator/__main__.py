"""`python -m services.aggregator`: run the aggregator service."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.aggregator.settings import AggregatorConfig
from services.common.flags import Group, SettingsParser

GROUPS = (
    Group("service", "AGGREGATOR_"),
    Group(
        "transport",
        only=(
            "tls_dir",
            "auth_token",
            "auth_token_file",
            "he_key",
            "max_update_bytes",
            "stream_idle_s",
            "stream_max_s",
        ),
    ),
    Group(
        "federation",
        only=("strategy", "model", "dataset", "seed", "personalise", "secure", "guard"),
    ),
    Group("defence"),
    Group("training", only=("lr", "lr_decay")),
    Group("store", "AGGREGATOR_"),
    Group("compute", "AGGREGATOR_"),
    Group("sample"),
    Group("privacy"),
    Group("pace"),
)


def parser() -> SettingsParser:
    """The aggregator's flags, from its settings groups."""
    return SettingsParser.command(
        "python -m services.aggregator", __doc__, AggregatorConfig, GROUPS
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM."""
    config: AggregatorConfig = parser().parse(argv)
    # Imported here: parser() alone (simulate reads every service's flags) needs no torch.
    from services.aggregator.server import build_service
    from services.transport.serving import serve_main

    return serve_main("aggregator", config.service, lambda: build_service(config))


if __name__ == "__main__":
    sys.exit(main())
