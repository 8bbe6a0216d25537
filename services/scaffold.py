"""`flclustering new DIR`: a small task package to edit, for a federation on owners' own data.

It writes what a federation with its own model and data needs and nothing else: the model's
factory (`task/__init__.py`, `make(input_shape, outputs)`), the run file every process reads
(`run.yaml`: `dataset: own`, `model: task:make`, what a sample is), a README with the
commands from an empty directory to a running federation, and `example_data.py`, which writes
folders of handwritten digits to try it on before the owners' own data is there. The
templates are plain text here (nothing is imported or run to write them); tests/unit/
test_scaffold.py writes them, imports the factory, parses the run file with each service's
parser and runs init-model on it.
"""

from __future__ import annotations

from pathlib import Path

from services.core.errors import ConfigError

FACTORY = '''\
"""The model every participant trains: `make` builds it.

The run file names it (`federation: model: task:make`). Participants and `flclustering
init-model` import this package (its folder on PYTHONPATH, or installed) and call `make` with
the keywords it declares of `input_shape` (C, H, W of one sample, from the run file's sample
group; a table's is (1, 1, features)) and `outputs` (the classes, or 1 for regression). The
aggregator never imports it: it starts from the weights init-model writes (w0) and checks
every upload against their names, shapes and dtypes.

Edit freely, keeping to three rules:
- floating-point tensors stay float32 (they are what travels and is aggregated);
- every participant builds the same tensors as w0: write w0 again (init-model) after any
  change to the architecture, and give every participant the same version of this file;
- prefer GroupNorm (or no norm) to BatchNorm: BatchNorm's running statistics travel in every
  update and are averaged across owners whose data differ.
"""

from __future__ import annotations

import torch
from torch import nn


def make(input_shape: tuple[int, int, int], outputs: int) -> nn.Module:
    """A small CNN for images (two 3x3 convolutions, each followed by 2x2 max-pooling, then
    two linear layers); for a table, (1, 1, features), a small fully connected network."""
    channels, height, width = input_shape
    if height == 1:  # a table: one row of features
        return nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, outputs))
    features = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():  # the flattened size for this input shape
        flat = features(torch.zeros(1, channels, height, width)).shape[1]
    return nn.Sequential(features, nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, outputs))
'''

RUN_FILE = """\
# The federation's settings: one file for every process. Pass it to `flclustering init-model`,
# the aggregator, the clusterer and every participant with --config run.yaml; environment
# variables and flags override it. Each setting's meaning: `python -m services.participant
# --help` (and the other services'); all of them with defaults: `flclustering config --format yaml`.
federation:
  dataset: own            # every participant trains on everything in its own --data-dir
  model: task:make        # make() in task/__init__.py: this folder must be on PYTHONPATH
  strategy: flclustering
  participants: 3         # participant processes, started with --index 0, 1, 2
  select: 3               # participants selected each round
  clusters: 1             # raise it with more participants: each cluster's defence needs several
  rounds: 10
  seed: 0                 # w0 and the participants' models: the same everywhere
training:
  local_epochs: 1
  batch_size: 32
  lr: 0.05
  pre_steps: 20
# What one sample is. Every participant checks its data against this before it joins and sends
# it at Join; the clusterer refuses a participant whose sample group differs in anything.
sample:
  data_kind: image        # or table (with features and label_column instead of sample_shape)
  target: classification  # or regression (no class_names; scored by R^2)
  class_names: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]  # in label order
  sample_shape: [1, 28, 28]  # C,H,W: grey 28x28; images of other sizes are resized to it
  normalise: own          # each participant's own statistics, never sent (or declared, none)
  test_fraction: 0.2      # held out when a participant's data has no test split of its own
  split_seed: 0
"""

README = """\
# A federation on your own data

`flclustering new` wrote this folder:

- `task/__init__.py`: the model, `make(input_shape, outputs)`; edit it;
- `run.yaml`: the federation's settings (`dataset: own`, `model: task:make`, three
  participants) and what one sample is (28x28 grey images of the classes "0" to "9"); edit it;
- `example_data.py`: writes three folders of handwritten digits to try it on.

Run every command below in this folder, with FLClustering installed (its `.venv/bin` on
`PATH`), one terminal per process. Only `init-model` and the participants import `task/`:
they need this folder on `PYTHONPATH`.

```bash
# once: the TLS kit (a CA and one certificate per party) and w0, the model's starting weights
flclustering certs --out kit --participants 3
PYTHONPATH=$PWD flclustering init-model --config run.yaml --out w0
# no data yet? three owners' folders of digits (one sub-folder per class)
python example_data.py data --owners 3
# terminal 1: the aggregator; it never imports task/, it starts from w0
python -m services.aggregator --config run.yaml --tls-dir kit --initial-model w0/model.safetensors --state-dir state/aggregator
# terminal 2: the clusterer
python -m services.clusterer --config run.yaml --tls-dir kit --aggregator 127.0.0.1:50052 --state-dir state/clusterer
# terminals 3 to 5: participant N = 0, 1, 2, each on its own data (kit/participant-0000N.crt)
PYTHONPATH=$PWD python -m services.participant --config run.yaml --tls-dir kit --clusterer 127.0.0.1:50051 --index 0 --data-dir data/owner-0
PYTHONPATH=$PWD python -m services.participant --config run.yaml --tls-dir kit --clusterer 127.0.0.1:50051 --index 1 --data-dir data/owner-1
PYTHONPATH=$PWD python -m services.participant --config run.yaml --tls-dir kit --clusterer 127.0.0.1:50051 --index 2 --data-dir data/owner-2
```

The clusterer waits for all three participants, then runs the rounds; each round's figures
are in its log and in `state/clusterer/history.json`. Each participant logs what it found in
its `--data-dir` (the format, its training and test examples, the split) and refuses to
start, in one line naming the file, on data that does not fit `run.yaml`'s sample group.

On separate machines, give each party only its own key (`kit/NAME.key`) and `kit/ca.crt`,
each participant this folder's `run.yaml` and `task/`, and the machines' addresses instead of
127.0.0.1 (make the kit with `--clusterer-dns` and `--aggregator-dns` for their names).

Changing the model: edit `task/__init__.py`, write w0 again and restart everything from an
empty `state/`. Changing what a sample is (other classes, RGB, another size, a table):
edit `run.yaml`'s sample group, the same file for every process. All of it, with the data
formats a participant may hold: FLClustering's documentation, "Your own data and model"
(docs/own-data.md).
"""

EXAMPLE_DATA = '''\
"""Example data to try the federation on: scikit-learn's handwritten digits (1,797 images of
8x8 pixels, shipped with it: no download) scaled to 28x28 grey PNGs, dealt to owners.

    python example_data.py data --owners 3

writes data/owner-0, data/owner-1, ..., each a disjoint, seeded share of the digits in one
sub-folder per class ("0" to "9"): a layout `--dataset own` reads as an image folder. Your
own data replaces them: any layout the participants read (see the README).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write owner-0, owner-1, ... into")
    parser.add_argument("--owners", type=int, default=3, help="owners (default: 3)")
    parser.add_argument("--size", type=int, default=28, help="image side (default: 28)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deal (default: 0)")
    args = parser.parse_args()
    if args.owners < 1:
        parser.error("--owners must be at least 1")
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.target))
    for n, i in enumerate(order):
        folder = args.out / f"owner-{n % args.owners}" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(pixels).resize((args.size, args.size), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:04d}.png")
    print(f"wrote {len(order)} images to {args.out}/owner-0 .. owner-{args.owners - 1}")


if __name__ == "__main__":
    main()
'''

FILES = {
    "task/__init__.py": FACTORY,
    "run.yaml": RUN_FILE,
    "README.md": README,
    "example_data.py": EXAMPLE_DATA,
}


def write_scaffold(directory: Path, force: bool = False) -> list[Path]:
    """Write the task package into directory (made if missing); the paths written.

    An existing directory that holds anything is refused (ConfigError, one line) unless
    force, which writes these files over any of the same name and leaves the rest alone.
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ConfigError(
            f"{directory} exists and is not empty: name a new directory, or pass --force to "
            "write the scaffold's files into it (replacing files of the same names)"
        )
    written = []
    try:
        for name, text in FILES.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise ConfigError(f"{directory}: {exc.strerror or exc}") from None
    return written


__all__ = ["FILES", "write_scaffold"]
