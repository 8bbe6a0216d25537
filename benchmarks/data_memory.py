"""A data owner's memory while it trains on more images than it should ever hold: the
participant's resident memory, summed over its process tree (its data-loader workers
included), against the size of its image folder.

Writes an image folder of about `--gigabytes` GB (RGB 256x256 PNG files, one sub-folder per
class under train/, a small test/ beside it; each image is a class's stripes under noise,
so the PNG stays about as big as the pixels), and a small folder of 1/`--shrink` of its
training images (hard links: the baseline). Then runs, for each folder, a real federation
over mutual TLS: an aggregator, a clusterer and ONE participant process with `--dataset own
--data-dir FOLDER --loader-workers 2`, FedAvg, 1 round of 1 local epoch over every
training image, the `cnn` model on the declared sample 3x32x32 (the loaders resize), the
`own` normalisation (statistics of 2,000 images) and augmentation. Every 0.2 s it sums VmRSS
(and Pss, from smaps_rollup) over the participant and all its descendants
(/proc/PID/task/*/children). It checks that the participant trained every training image
(its `examples_processed_total` metric against its log's count) and prints each run's peak,
the ratio big / small (memory must not grow with the data) and, last:

    participant RSS X MB for Y MB of images

(MB are MiB, GB GiB.) It exits non-zero when X is the goal (1,536 MB) or more, or when an
image went untrained.

    python benchmarks/data_memory.py [--gigabytes 2.0] [--shrink 50] [--loader-workers 2]
        [--work DIR] [--keep]
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from script import parser, write_json  # beside this script

from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.simulate import Processes, child_environment, follow, free_ports
from services.transport.client import channel
from services.transport.credentials import hand_out, load_tls, participant_id, write_kit

GOAL_MB = 1536
SIDE = 256
CLASSES = [f"c{k}" for k in range(10)]
MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


# --- the image folder ------------------------------------------------------------------------


def class_patterns(side: int) -> np.ndarray:
    """One RGB pattern per class (10, side, side, 3), uint8 in 48..207: stripes of a
    class's own angle and frequency, which survive the resize to 32x32 (the noise added to
    each image does not: it averages out)."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for k in range(len(CLASSES)):
        angle, freq = np.pi * k / len(CLASSES), 2 + k % 5
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        rgb = (128 + 72 * wave)[..., None] * np.array([1.0, 0.85, 0.7]) + (k // 5) * 20
        out.append(np.clip(rgb, 48, 207).astype(np.uint8))
    return np.stack(out)


def png(patterns: np.ndarray, k: int, seed: int) -> bytes:
    """Image k: its class's pattern plus uniform noise of 96 levels per channel (about 6.6
    bits a value: zlib keeps about 90% of the pixels' bytes), PNG at compress level 1."""
    rng = np.random.default_rng([seed, k])
    side = patterns.shape[1]
    noise = rng.integers(0, 96, (side, side, 3), dtype=np.uint8)
    pixels = patterns[k % len(CLASSES)] - 48 + noise
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def write_chunk(job: tuple[str, int, int, int, int]) -> int:
    """Images start..stop-1 into folder/<class>/NNNNNN.png; the bytes written."""
    folder, start, stop, side, seed = job
    patterns = class_patterns(side)
    written = 0
    for k in range(start, stop):
        data = png(patterns, k, seed)
        (Path(folder) / CLASSES[k % len(CLASSES)] / f"{k:06d}.png").write_bytes(data)
        written += len(data)
    return written


def write_images(folder: Path, count: int, side: int, seed: int, writers: int) -> int:
    """`count` images in one sub-folder per class, written by `writers` processes (forked
    now, before this process has started any thread); the bytes written."""
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    step = 100
    jobs = [(str(folder), s, min(count, s + step), side, seed) for s in range(0, count, step)]
    if writers <= 1 or len(jobs) == 1:
        return sum(map(write_chunk, jobs))
    with multiprocessing.get_context("fork").Pool(writers) as pool:
        return sum(pool.imap_unordered(write_chunk, jobs))


def folder_bytes(folder: Path) -> int:
    """The size of every file under folder (st_size)."""
    return sum(p.stat().st_size for p in folder.rglob("*.png"))


def link_subset(big: Path, small: Path, count: int) -> None:
    """small/train: hard links to the first `count` training images of big (every class
    alike: image k is class k % 10); small/test: links to all of big's test images."""
    for split in ("train", "test"):
        for src in sorted((big / split).rglob("*.png")):
            if split == "train" and int(src.stem) >= count:
                continue
            dst = small / split / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)


# --- memory of a process tree --------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and all its descendants (the children lists of every thread, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
    return out


def kb_field(path: str, name: str) -> int | None:
    """A `Name:  N kB` line of a /proc file, in bytes; None once the process is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


@dataclass
class TreeMemory:
    """Samples of a process tree's memory: the peak of the summed RSS (with each process's
    RSS at that moment), the peak of the summed PSS, every process's own peak (VmHWM)."""

    pid: int
    interval: float
    peak_rss: int = 0
    at_peak: dict[int, int] = field(default_factory=dict)
    peak_pss: int = 0
    hwm: dict[int, int] = field(default_factory=dict)
    most_processes: int = 0
    samples: int = 0

    def sample(self) -> None:
        rss: dict[int, int] = {}
        pss = 0
        for p in tree(self.pid):
            r = kb_field(f"/proc/{p}/status", "VmRSS")
            if r is None:
                continue
            rss[p] = r
            pss += kb_field(f"/proc/{p}/smaps_rollup", "Pss") or 0
            self.hwm[p] = max(self.hwm.get(p, 0), kb_field(f"/proc/{p}/status", "VmHWM") or 0)
        total = sum(rss.values())
        self.samples += 1
        self.most_processes = max(self.most_processes, len(rss))
        self.peak_pss = max(self.peak_pss, pss)
        if total > self.peak_rss:
            self.peak_rss, self.at_peak = total, rss

    def watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(self.interval)


# --- one federation ---------------------------------------------------------------------


def run_file(path: Path, batch_size: int) -> None:
    """The run file all three services read: FedAvg, one participant, one round of one
    epoch, the `cnn` model on 3x32x32, own normalisation and augmentation."""
    settings = {
        "federation": {
            "strategy": "fedavg",
            "dataset": "own",
            "model": "cnn",
            "participants": 1,
            "select": 1,
            "rounds": 1,
            "seed": 0,
        },
        "training": {"local_epochs": 1, "batch_size": batch_size, "lr": 0.02},
        "transport": {
            "round_timeout_s": 7200.0,
            "eval_timeout_s": 1800.0,
            "liveness_s": 7200.0,
            "poll_cap_s": 2.0,
        },
        "sample": {
            "data_kind": "image",
            "sample_shape": [3, 32, 32],
            "class_names": CLASSES,
            "augment_crop": 4,
            "augment_flip": True,
        },
    }
    path.write_text(json.dumps(settings, indent=2))


def scrape(address: str, metric: str) -> float:
    """The sum of a metric's samples on a Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric) and not line.startswith("#")
    )


@dataclass
class Run:
    label: str
    memory: TreeMemory
    n_train: int
    n_test: int
    examples: int
    accuracy: float
    seconds: float


def federation(root: Path, data: Path, label: str, workers: int, interval: float) -> Run:
    """An aggregator, a clusterer and one participant over `data`, over mTLS, until the
    federation is done, the participant's tree sampled meanwhile."""
    root.mkdir(parents=True)
    logs = root / "logs"
    logs.mkdir()
    run_file(root / "run.json", 64)
    kit = root / "kit"
    write_kit(kit, [participant_id(0)])
    dirs = hand_out(
        kit,
        {
            "aggregator": ["aggregator"],
            "clusterer": ["clusterer"],
            "operator": ["operator"],
            "p0": [participant_id(0)],
        },
    )
    env = {**child_environment(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    common = ["--config", str(root / "run.json")]
    agg, clu = free_ports(0, 0)
    clusterer = f"127.0.0.1:{clu}"
    procs = Processes(logs)
    stop = threading.Event()
    start = time.perf_counter()
    try:
        procs.start(
            "aggregator",
            [
                "services.aggregator",
                *common,
                "--metrics-port=0",
                f"--tls-dir={dirs['aggregator']}",
                "--host=127.0.0.1",
                f"--port={agg}",
            ],
            env,
        )
        procs.start(
            "clusterer",
            [
                "services.clusterer",
                *common,
                "--metrics-port=0",
                f"--tls-dir={dirs['clusterer']}",
                "--host=127.0.0.1",
                f"--port={clu}",
                f"--aggregator=127.0.0.1:{agg}",
            ],
            env,
        )
        procs.start(
            "participant",
            [
                "services.participant",
                *common,
                f"--tls-dir={dirs['p0']}",
                f"--clusterer={clusterer}",
                "--index=0",
                f"--data-dir={data}",
                f"--loader-workers={workers}",
                "--poll-wait-s=2",
                "--metrics-host=127.0.0.1",
                "--metrics-port=auto",
                f"--ready-file={logs / 'participant.ready'}",
                "--linger=true",  # serves its metrics after the federation: examples trained
            ],
            env,
        )
        memory = TreeMemory(procs.children["participant"][0].pid, interval)
        sampler = threading.Thread(target=memory.watch, args=(stop,), daemon=True)
        sampler.start()
        operator = load_tls(dirs["operator"], "operator")
        stub = pb_grpc.ClustererStub(channel(clusterer, client=operator))
        status = follow(stub, procs, None)
        ready = procs.wait_ready("participant", logs / "participant.ready")
        examples = int(scrape(ready["metrics"], "flclustering_examples_processed_total"))
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    finally:
        stop.set()
        procs.stop()
    log = (logs / "participant.log").read_text()
    m = re.search(r"own data in .*?: image-folder, (\d+) training and (\d+) test examples", log)
    if m is None:
        raise SystemExit(f"{label}: the participant's log names no own data:\n{log[-2000:]}")
    accuracy = status.history[-1].mean_accuracy if status.history else float("nan")
    return Run(label, memory, int(m.group(1)), int(m.group(2)), examples, accuracy, seconds)


def describe(run: Run, images_mb: float) -> str:
    """Two lines: what was trained, then the memory it took."""
    mem = run.memory
    others = sorted((v for p, v in mem.at_peak.items() if p != mem.pid), reverse=True)
    return (
        f"{run.label:<5}: {images_mb:7,.0f} MB of images, {run.n_train:,} training images "
        f"({run.examples:,} trained), {run.n_test:,} test, accuracy {run.accuracy:.3f}, "
        f"{run.seconds:.0f} s\n"
        f"       peak RSS {mem.peak_rss / MB:,.0f} MB over {len(mem.at_peak)} processes "
        f"(participant {mem.at_peak.get(mem.pid, 0) / MB:,.0f} MB, workers "
        f"{', '.join(f'{v / MB:,.0f}' for v in others) or 'none'} MB); peak PSS "
        f"{mem.peak_pss / MB:,.0f} MB; each process's own peak (VmHWM), summed over the "
        f"{len(mem.hwm)} seen: {sum(mem.hwm.values()) / MB:,.0f} MB; {mem.samples} samples"
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--gigabytes", type=float, default=2.0, help="size of the training images")
    p.add_argument("--shrink", type=int, default=50, help="the baseline holds 1/SHRINK of them")
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--writers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="an empty or new folder for the images and runs")
    p.add_argument("--keep", action="store_true", help="keep the images and logs")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()
    begin = time.perf_counter()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="data-memory-"))
    if work.is_dir() and any(work.iterdir()):  # it is deleted at the end: only one of ours
        raise SystemExit(f"--work {work}: not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        patterns = class_patterns(SIDE)
        per_image = float(np.mean([len(png(patterns, k, a.seed + 1)) for k in range(20)]))
        count = max(len(CLASSES) * a.shrink, round(a.gigabytes * (1 << 30) / per_image))
        big = work / "big"
        t = time.perf_counter()
        write_images(big / "train", count, SIDE, a.seed, a.writers)
        write_images(big / "test", a.test_images, SIDE, a.seed + 1, a.writers)
        written = time.perf_counter() - t
        small = work / "small"
        link_subset(big, small, count // a.shrink)
        big_mb = folder_bytes(big / "train") / MB
        small_mb = folder_bytes(small / "train") / MB
        print(
            f"images: {count:,} training images ({SIDE}x{SIDE} RGB PNG, {big_mb:,.0f} MB) and "
            f"{a.test_images} test images, written in {written:.0f} s by {a.writers} "
            f"processes ({count / written:,.0f} images/s); baseline: the first "
            f"{count // a.shrink:,} ({small_mb:,.0f} MB)",
            flush=True,
        )
        runs = []
        for label, folder, mb in (("small", small, small_mb), ("big", big, big_mb)):
            run = federation(work / f"run-{label}", folder, label, a.loader_workers, a.interval)
            print(describe(run, mb), flush=True)
            runs.append(run)
        base, full = runs
        ratio = full.memory.peak_rss / base.memory.peak_rss
        print(
            f"peak RSS big / small: {ratio:.2f} ({big_mb / small_mb:.0f}x the images); "
            f"wall time {time.perf_counter() - begin:.0f} s"
        )
        write_json(
            a.json,
            {
                "images_mb": big_mb,
                "baseline_images_mb": small_mb,
                "ratio": ratio,
                "write_s": written,
                "runs": [
                    {
                        "label": r.label,
                        "peak_rss_mb": r.memory.peak_rss / MB,
                        "peak_pss_mb": r.memory.peak_pss / MB,
                        "processes_at_peak": len(r.memory.at_peak),
                        "n_train": r.n_train,
                        "examples": r.examples,
                        "seconds": r.seconds,
                    }
                    for r in runs
                ],
            },
            2,
        )
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r.label for r in runs if r.examples != r.n_train]
    if failed:
        print(f"not every training image was trained: {failed}")
    peak = round(full.memory.peak_rss / MB)
    if peak >= GOAL_MB:
        print(f"goal missed: the participant's tree peaked at {peak:,} MB (goal under {GOAL_MB:,})")
    print(f"participant RSS {peak} MB for {round(big_mb)} MB of images")
    if failed or peak >= GOAL_MB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
