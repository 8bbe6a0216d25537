"""Federations of data owners: every participant process trains on the files in its own
folder, with a model from its owners' package, over mutual TLS.

Real processes (`python -m services.aggregator`, `services.clusterer`, one
`services.participant` per owner), a real certificate per party, real files written here:
28x28 PNG digits (scikit-learn's 8x8 digits, upsampled), CSV and Parquet tables split from
scikit-learn's breast-cancer and diabetes sets. The user's model lives in a package in a
temporary directory, outside this repository; the aggregator is started without it on its
path and starts from the weights `flclustering init-model` wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from PIL import Image

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.schema import SchemaSettings
from services.common.settings import TrainingSettings
from services.core.models import build_model
from services.core.objectives import OBJECTIVES
from services.participant.sources import open_own_data
from services.participant.training import evaluate, local_train
from services.simulate import Processes, child_environment, follow, free_ports, members
from services.transport.client import channel
from services.transport.credentials import hand_out, load_tls, participant_id, write_kit

REPO = Path(__file__).resolve().parents[2]

# A user's package: a small CNN for images, built from the schema's shape and classes. It
# leaves a mark (its process id) wherever it is imported, so the test can tell who ran it.
USER_PACKAGE = """
import os
from pathlib import Path

import torch
from torch import nn

Path(os.environ["OWNMODEL_MARKS"], str(os.getpid())).touch()


class Net(nn.Module):
    def __init__(self, channels, size, outputs):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(16 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, outputs)
        )

    def forward(self, x):
        return self.head(self.features(x))


def make(input_shape, outputs):
    c, h, w = input_shape
    return Net(c, h, outputs)
"""


def transport() -> dict[str, Any]:
    return {
        "round_timeout_s": 120.0,
        "eval_timeout_s": 120.0,
        "pretrain_timeout_s": 180.0,
        "liveness_s": 600.0,
        "poll_cap_s": 2.0,
    }


class OwnFederation:
    """An aggregator, a clusterer and one participant process per data folder, over mTLS,
    all reading one run file; the operator watches over its own certificate."""

    def __init__(self, root: Path, settings: dict[str, Any], folders: list[Path]) -> None:
        self.root = root
        self.folders = folders
        self.run_file = root / "run.json"
        self.run_file.write_text(json.dumps(settings))
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs = Processes(self.logs)
        self.env = {**child_environment(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}

    def start(
        self, aggregator_flags: list[str], participant_env: dict[str, str] | None = None
    ) -> None:
        n = len(self.folders)
        kit = self.root / "kit"
        write_kit(kit, [participant_id(i) for i in range(n)])
        holders = {
            "aggregator": ["aggregator"],
            "clusterer": ["clusterer"],
            "operator": ["operator"],
            **{f"p{i}": [participant_id(i)] for i in range(n)},
        }
        self.dirs = hand_out(kit, holders)
        agg_port, clu_port = free_ports(0, 0)
        self.clusterer = f"127.0.0.1:{clu_port}"
        common = ["--config", str(self.run_file), "--metrics-port", "0"]
        self.procs.start(
            "aggregator",
            [
                "services.aggregator",
                *common,
                "--tls-dir",
                str(self.dirs["aggregator"]),
                "--host",
                "127.0.0.1",
                "--port",
                str(agg_port),
                *aggregator_flags,
            ],
            self.env,
        )
        self.procs.start(
            "clusterer",
            [
                "services.clusterer",
                *common,
                "--tls-dir",
                str(self.dirs["clusterer"]),
                "--host",
                "127.0.0.1",
                "--port",
                str(clu_port),
                "--aggregator",
                f"127.0.0.1:{agg_port}",
            ],
            self.env,
        )
        for i, folder in enumerate(self.folders):
            self.procs.start(
                f"p{i}",
                [
                    "services.participant",
                    *common,
                    "--tls-dir",
                    str(self.dirs[f"p{i}"]),
                    "--clusterer",
                    self.clusterer,
                    "--index",
                    str(i),
                    "--data-dir",
                    str(folder),
                    "--loader-workers",
                    str(i % 2),  # half read images in worker processes, half in their own
                    "--poll-wait-s",
                    "2",
                ],
                {**self.env, **(participant_env or {})},
            )

    def run(self) -> tuple[pb.GetStatusResponse, dict[int, int]]:
        """Wait for the federation to finish: its status and each participant's cluster."""
        operator = load_tls(self.dirs["operator"], "operator")
        stub = pb_grpc.ClustererStub(channel(self.clusterer, client=operator))
        status = follow(stub, self.procs, None)
        clusters = {int(m.participant_id.rsplit("-", 1)[1]): m.cluster for m in members(stub)}
        return status, clusters

    def stop(self) -> None:
        self.procs.stop()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()


def upsampled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 28x28 grey images (uint8), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0 * 255).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR)) for im in small]
    )
    return big, digits.target


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray, size: int = 28) -> None:
    """One sub-folder per class of PNG files; images of another size when asked."""
    for k, (im, y) in enumerate(zip(images, labels, strict=True)):
        d = folder / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(im)
        if size != 28:
            picture = picture.resize((size, size), Image.BILINEAR)
        picture.save(d / f"{k:05d}.png")


# Three groups of owners, two owners each, each group holding mostly its own digits.
GROUPS = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))


def owner_folders(root: Path) -> tuple[list[Path], list[int]]:
    """Six image folders: owners 2g and 2g+1 share group g's digits (and a tenth of the
    others'); owner 5's images are 20x20 (the declared size is 28x28)."""
    images, labels = upsampled_digits()
    rng = np.random.default_rng(0)
    folders, groups = [], []
    for g, home in enumerate(GROUPS):
        mine = np.isin(labels, home)
        extra = ~mine & (rng.random(len(labels)) < 0.1)
        idx = rng.permutation(np.flatnonzero(mine | extra))
        for half, part in enumerate(np.array_split(idx, 2)):
            i = 2 * g + half
            folder = root / f"owner{i}"
            write_images(folder, images[part], labels[part], size=20 if i == 5 else 28)
            folders.append(folder)
            groups.append(g)
    return folders, groups


def test_owners_with_image_folders_and_their_own_model(tmp_path: Path) -> None:
    """Six owners, each with an image folder of its own class mix, and a model from a
    package outside this repository: w0 from init-model, an aggregator that never imports
    the package, clusters that are the groups the test built, mean accuracy >= 0.90."""
    folders, groups = owner_folders(tmp_path / "data")
    package = tmp_path / "package"
    (package / "ownmodel").mkdir(parents=True)
    (package / "ownmodel" / "__init__.py").write_text(USER_PACKAGE)
    marks = tmp_path / "marks"
    marks.mkdir()
    settings = {
        "federation": {
            "strategy": "flclustering",
            "dataset": "own",
            "model": "ownmodel:make",
            "participants": 6,
            "select": 6,
            "rounds": 8,
            "clusters": 3,
            "eval_per_cluster": 2,
            "seed": 0,
        },
        "training": {"local_epochs": 2, "pre_steps": 20, "lr": 0.05},
        "transport": transport(),
        "sample": {
            "data_kind": "image",
            "sample_shape": [1, 28, 28],
            "class_names": [str(c) for c in range(10)],
        },
    }
    fed = OwnFederation(tmp_path, settings, folders)
    user_env = {"PYTHONPATH": f"{REPO}{os.pathsep}{package}", "OWNMODEL_MARKS": str(marks)}
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "init-model",
            "--config",
            str(fed.run_file),
            "--out",
            str(tmp_path / "w0"),
        ],
        env={**fed.env, **user_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "w0" / "model.safetensors").is_file()
    fed.env["OWNMODEL_MARKS"] = str(marks)  # the aggregator and clusterer: no package path
    try:
        fed.start(
            ["--initial-model", str(tmp_path / "w0" / "model.safetensors")],
            participant_env=user_env,
        )
        status, clusters = fed.run()
        aggregator_pid = fed.procs.children["aggregator"][0].pid
    finally:
        fed.stop()
    final = status.history[-1]
    print("images: mean accuracy by round", [round(h.mean_accuracy, 3) for h in status.history])
    assert final.mean_accuracy >= 0.90, [h.mean_accuracy for h in status.history]
    # The clusters are the groups: same group, same cluster; different groups, different.
    found = {g: {clusters[i] for i, gi in enumerate(groups) if gi == g} for g in range(3)}
    assert all(len(c) == 1 for c in found.values()), (found, clusters)
    assert len(set().union(*found.values())) == 3, found
    # Who ran the user's code: every participant (and init-model), never the aggregator.
    ran = {int(p.name) for p in marks.iterdir()}
    participant_pids = {fed.procs.children[f"p{i}"][0].pid for i in range(6)}
    assert participant_pids <= ran
    assert aggregator_pid not in ran
    assert fed.procs.children["clusterer"][0].pid not in ran
    # Owner 5's 20x20 images were resized to the declared 28x28, and it trained on them.
    assert f"own data in {folders[5]}" in fed.log("p5"), fed.log("p5")


def split_table(
    x: np.ndarray, y: np.ndarray, owners: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Each owner's (x_train, y_train, x_test, y_test): a shuffled split, a quarter held out."""
    rng = np.random.default_rng(seed)
    parts = []
    for idx in np.array_split(rng.permutation(len(y)), owners):
        cut = len(idx) // 4
        test, train = idx[:cut], idx[cut:]
        parts.append((x[train], y[train], x[test], y[test]))
    return parts


def table(x: np.ndarray, y: np.ndarray, names: list[str], label: str) -> pa.Table:
    columns = {n: pa.array(x[:, k]) for k, n in enumerate(names)}
    return pa.table({**columns, label: pa.array(y)})


def centralised(
    schema: SchemaSettings, model: str, pooled: Path, rounds: int, training: TrainingSettings
) -> float:
    """The baseline: the same model trained on the pooled training data (as many epochs as
    rounds times local epochs), its loss and score on the pooled test data."""
    data = open_own_data(pooled, schema, workers=0)
    net = build_model(model, schema.input_shape, schema.outputs, 0)
    objective = OBJECTIVES[schema.target]
    gen = torch.Generator().manual_seed(0)
    for rnd in range(rounds):
        local_train(net, data.train, training, rnd, gen, objective)
    loss, score = evaluate(net, data.test, objective=objective)
    return loss if schema.target == "regression" else score


def tabular_federation(
    tmp_path: Path,
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    names: list[str],
    sample: dict[str, Any],
    suffix: str,
    rounds: int,
    training: dict[str, Any],
) -> tuple[pb.GetStatusResponse, Path]:
    """Run a federation of owners each with train and test files; the pooled files too."""
    write = pa_csv.write_csv if suffix == ".csv" else pq.write_table
    label = sample.get("label_column", "label")
    folders = []
    for i, (xa, ya, xb, yb) in enumerate(parts):
        folder = tmp_path / f"owner{i}"
        folder.mkdir()
        write(table(xa, ya, names, label), str(folder / f"train{suffix}"))
        write(table(xb, yb, names, label), str(folder / f"test{suffix}"))
        folders.append(folder)
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    stack = [np.concatenate([p[k] for p in parts]) for k in range(4)]
    write(table(stack[0], stack[1], names, label), str(pooled / f"train{suffix}"))
    write(table(stack[2], stack[3], names, label), str(pooled / f"test{suffix}"))
    settings = {
        "federation": {
            "strategy": "flclustering",
            "dataset": "own",
            "model": "2nn",
            "participants": len(parts),
            "select": len(parts),
            "rounds": rounds,
            "clusters": 1,
            "eval_per_cluster": 2,
            "seed": 0,
        },
        "training": training,
        "transport": transport(),
        "sample": sample,
    }
    fed = OwnFederation(tmp_path, settings, folders)
    try:
        fed.start([])
        status, _ = fed.run()
    finally:
        fed.stop()
    return status, pooled


def test_owners_with_csv_tables_reach_the_centralised_accuracy(tmp_path: Path) -> None:
    """Four owners with a CSV table each (breast cancer): within 3 points of the same model
    trained on the pooled data."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [f"f{k}" for k in range(data.data.shape[1])]
    labels = np.array([data.target_names[t] for t in data.target])  # labels by name
    parts = split_table(data.data.astype(np.float64), labels, 4, seed=1)
    sample = {
        "data_kind": "table",
        "features": names,
        "label_column": "diagnosis",
        "class_names": [str(c) for c in data.target_names],
    }
    training = {"local_epochs": 2, "lr": 0.01, "batch_size": 16}
    rounds = 6
    status, pooled = tabular_federation(tmp_path, parts, names, sample, ".csv", rounds, training)
    baseline = centralised(
        SchemaSettings.build(**sample),
        "2nn",
        pooled,
        rounds * 2,
        TrainingSettings.build(**{**training, "local_epochs": 1}),
    )
    final = status.history[-1].mean_accuracy
    print(f"breast cancer: federation {final:.3f}, centralised {baseline:.3f}")
    assert final >= baseline - 0.03, (final, baseline)
    assert baseline >= 0.9


def test_owners_with_parquet_tables_learn_a_regression(tmp_path: Path) -> None:
    """Four owners with a Parquet table each (diabetes): the federation's mean squared
    error within 10% of the same model trained on the pooled data."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    names = list(data.feature_names)
    parts = split_table(data.data.astype(np.float64), data.target.astype(np.float64), 4, seed=2)
    sample = {
        "data_kind": "table",
        "target": "regression",
        "features": names,
        "label_column": "progression",
        "target_mean": float(data.target.mean()),
        "target_std": float(data.target.std()),
    }
    training = {"local_epochs": 2, "lr": 0.01, "batch_size": 16}
    rounds = 6
    status, pooled = tabular_federation(
        tmp_path, parts, names, sample, ".parquet", rounds, training
    )
    baseline = centralised(
        SchemaSettings.build(**sample),
        "2nn",
        pooled,
        rounds * 2,
        TrainingSettings.build(**{**training, "local_epochs": 1}),
    )
    final = status.history[-1].mean_loss
    print(f"diabetes: federation MSE {final:.3f}, centralised {baseline:.3f}")
    assert final <= 1.10 * baseline, (final, baseline)
    assert 0.0 < status.history[-1].mean_accuracy <= 1.0  # R^2, the fair merge's score
