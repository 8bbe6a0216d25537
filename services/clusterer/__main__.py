"""`python -m services.clusterer`: run the clusterer service."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.clusterer.settings import ClustererConfig
from services.common.flags import Group, SettingsParser
from services.common.settings import FederationSettings, TransportSettings

GROUPS = (
    Group("service", "CLUSTERER_"),
    # It holds no HE key: it relays ciphertexts it checks by their header.
    Group("transport", only=tuple(f for f in TransportSettings.model_fields if f != "he_key")),
    # The clusterer never builds the model: it relays it. It knows the dataset: own data
    # comes with the sample it checks every participant's declaration against.
    Group(
        "federation",
        only=tuple(f for f in FederationSettings.model_fields if f != "model"),
    ),
    Group("training"),
    Group("clustering", "CLUSTERER_"),
    Group("sample"),
    Group("privacy"),
    Group("pace"),
)


def parser() -> SettingsParser:
    """The clusterer's flags, from its settings groups."""
    return SettingsParser.command("python -m services.clusterer", __doc__, ClustererConfig, GROUPS)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM."""
    # Imported here: `simulate` reads this module's flags and must not import torch.
    from services.clusterer.server import build_service
    from services.transport.serving import serve_main

    config: ClustererConfig = parser().parse(argv)
    # Hand the GIL over every millisecond, not every 5: the loop serving thousands of
    # polls, the journal's threads and the health port's threads take turns, and a health
    # check waits for fewer long turns (p99 0.055-0.073 s at 10,000 participants against
    # 0.07-0.11 s, benchmarks/load.py).
    sys.setswitchinterval(0.001)
    return serve_main("clusterer", config.service, lambda: build_service(config))


if __name__ == "__main__":
    sys.exit(main())
