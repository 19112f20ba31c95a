"""Benchmark: the training loader at 224 px (issue #19, item 5): samples/s with N loader workers and in-process.

Builds (once, cached in ``--work``) a one-stage corpus of 224-px JPEG shards through the project's own ingest:
``--pairs`` photo-like pictures (random crops, flips and colour shifts of scikit-learn's two sample photos,
so the JPEG decode cost is that of real photos, not of flat colour), each with a distinct caption, centre
cropped to 224 px and re-encoded at ingest's default quality, 250 pairs per shard, plus a byte-level BPE
tokenizer. Then times ``data_tools.loaders.make_train_loader`` as configs/a100.yaml uses it (image 224,
context 77, augment on: random resized crop, held-out fraction 0.01) at batch ``--batch``:

- ``workers = 0`` (the loader in this process: ONE worker's rate): one loader per version, built and warmed up
  once (``--warmup`` batches: shuffle-buffer fill), timed in turn for ``--batches`` batches in each of
  ``--rounds`` rounds, with one torch thread (as in a DataLoader worker), so that a neighbour's load on a shared
  machine hits the versions alike;
- ``workers = --workers`` (default 8: configs/a100.yaml's ``data.num_workers``): each round and version a fresh
  loader (no other loader's workers alive), warmed up, its prefetched batches taken untimed, then
  ``max(--batches, 3 x workers)`` batches timed while every worker is busy;
- with ``--compare OTHER/loaders.py`` (e.g. ``git show bd30bf0:data_tools/loaders.py > /tmp/loaders_old.py``, the
  hand-written reader of issue #9) that version too, alternating with the current one;
- figures are medians over rounds: samples/s, and CPU ms per sample of the process(es) that read them (this
  process for 0 workers; the workers' ``/proc/PID/stat`` utime + stime otherwise): the load-insensitive figure on a
  shared machine. 1000 / (CPU ms per sample at 0 workers) is one core's rate.

"Keeps up with the training step": the figure to beat is a GPU step (a 224-px model's CPU step is far slower
than any loader). ``h100_step_samples_per_s`` is the ViT-B/16 training step of
benchmarks/README.md "GPU step and MFU" (H100, bf16, torch.compile, batch 512: 3202 samples/s per GPU), and
``workers_to_keep_up`` how many loader processes at the measured CPU time per sample feed it (configs/a100.yaml
gives each GPU 8 workers and 12 CPUs).

Prints one JSON line. Usage (on a shared machine run it niced, one benchmark at a time)::

    nice -n 10 .venv/bin/python benchmarks/loader_224.py [--workers 8] [--rounds 3] [--batches 20] [--batch 64]
        [--pairs 2000] [--compare OLD/loaders.py]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest
from data_tools.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
H100_STEP = 3202  # samples/s, ViT-B/16 224 px, bf16 + compile, batch 512 (benchmarks/README.md, 2026-11-23)
SHARD_SIZE = 250
_WORD_TEXT = (
    "red green blue small large old new wooden stone metal bright dark quiet busy tall short round square "
    "cat dog bird horse tree flower house car boat bridge river mountain street market table chair window "
    "garden field forest beach city village road lake sky cloud light shadow child woman man people group "
    "standing sitting walking running near behind under over beside across along inside outside front "
    "morning evening winter summer spring autumn photo picture view scene close wide painted covered"
)
WORDS = _WORD_TEXT.split()


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images  # the two photos ship with scikit-learn: no download

    return [np.asarray(img) for img in load_sample_images().images]


def _picture(rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """A random crop (side 160..full, aspect 3/4..4/3) of a sample photo, maybe flipped, colour-shifted."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(160, min(h, w) + 1))
    ch = side
    cw = min(w, int(side * rng.uniform(0.75, 4 / 3)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y : y + ch, x : x + cw].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * rng.uniform(0.75, 1.25, size=3) + rng.uniform(-20, 20)
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
    scale = 256 / min(img.size)  # like a crawl resized to img2dataset's default 256 before ingest
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)


def build_corpus(root: Path, pairs: int, seed: int = 0) -> None:
    """``pairs`` photo-like 224-px JPEG pairs in one stage of ``root`` (ingest, centre crop), and a tokenizer."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    src = root.parent / f"{root.name}-input"
    shutil.rmtree(src, ignore_errors=True)
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(pairs):
        rel = f"img/{i:06d}.jpg"
        _picture(rng, photos).save(src / rel, quality=95)
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))))
        rows.append({"caption": f"{words} number {i}", "image": rel})
    (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ImageOptions(image_size=224, resize_mode="center_crop")
    ingest(src / "pairs.jsonl", "table", root, opts=opts, shard_size=SHARD_SIZE, workers=2)
    train_tokenizer(root, vocab_size=4096)
    shutil.rmtree(src)


def _cpu_seconds(pids: list[int]) -> float | None:
    """utime + stime of ``pids`` (Linux ``/proc``), or None where it cannot be read."""
    total = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def _loader(loaders: Any, root: Path, workers: int, batch: int) -> Any:
    """The training loader at 224 px with configs/a100.yaml's settings (one stage, context 77, held-out 0.01)."""
    return loaders.make_train_loader(
        root, [1], batch_size=batch, image_size=224, context_length=77, seed=0, num_workers=workers,
        augment=True, val_fraction=0.01,
    )  # fmt: skip


def _timed(it: Iterator[Any], batches: int, cpu: Callable[[], float | None]) -> tuple[float, float | None]:
    """Samples/s and CPU ms per sample (``cpu()``: seconds of the processes that read them) over ``batches``."""
    cpu0, t0, n = cpu(), time.perf_counter(), 0
    for _ in range(batches):
        images, _tokens = next(it)
        n += images.shape[0]
    wall, cpu1 = time.perf_counter() - t0, cpu()
    return n / wall, None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / n


def in_process(modules: dict[str, Any], root: Path, args: argparse.Namespace) -> dict[str, list[Any]]:
    """``num_workers=0``, one loader per version built once, timed in turn each round (one torch thread, as in a
    DataLoader worker: the figure is one worker's)."""
    torch.set_num_threads(1)
    its = {}
    for name, module in modules.items():
        its[name] = iter(_loader(module, root, 0, args.batch))
        for _ in range(args.warmup):
            next(its[name])
    got: dict[str, list[Any]] = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name, it in its.items():
            got[name].append(_timed(it, args.batches, time.process_time))
    return got


def with_workers(modules: dict[str, Any], root: Path, args: argparse.Namespace) -> dict[str, list[Any]]:
    """``num_workers=args.workers``: each round and version a fresh loader (no other loader's workers alive),
    warmed up, its prefetched batches taken untimed, then timed while every worker is busy."""
    got: dict[str, list[Any]] = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name, module in modules.items():
            loader = _loader(module, root, args.workers, args.batch)
            it = iter(loader)
            for _ in range(args.warmup * args.workers + 2 * args.workers):  # start, buffer fill; prefetch queue
                next(it)
            inner = getattr(loader, "_iterator", None)  # the persistent workers (private DataLoader attributes)
            pids = [w.pid for w in getattr(inner, "_workers", [])]
            got[name].append(_timed(it, max(args.batches, 3 * args.workers), lambda pids=pids: _cpu_seconds(pids)))
            del it, loader, inner  # the workers exit before the next loader starts
    return got


def _loaders_module(path: Path | None) -> Any:
    """data_tools.loaders, or another version of it loaded from ``path`` (e.g. an older commit's)."""
    if path is None:
        import data_tools.loaders

        return data_tools.loaders
    spec = importlib.util.spec_from_file_location("loaders_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _git() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8, help="loader workers (timed beside the in-process loader)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per loader per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (every loader once per round)")
    ap.add_argument("--compare", type=Path, help="another loaders.py to time alternately with the current one")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches per worker first")
    ap.add_argument("--pairs", type=int, default=2000, help="corpus size (built once, cached in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/growclip-loader224"))
    ap.add_argument("--label", default="", help="what is measured (default: git describe --dirty)")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0]  # before the runs: the neighbours' load, not ours
    root = args.work / f"corpus{args.pairs}"
    if not (root / "tokenizer.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        build_corpus(root, args.pairs)
        print(f"built {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    modules = {"current": _loaders_module(None)}
    if args.compare:
        modules["compared"] = _loaders_module(args.compare)
    runs = []
    for workers, got in ((0, in_process(modules, root, args)), (args.workers, with_workers(modules, root, args))):
        for name, rounds in got.items():
            cpu = [c for _, c in rounds if c is not None]
            runs.append({
                "variant": name, "workers": workers,
                "samples_per_s": round(statistics.median(r for r, _ in rounds), 1),
                "cpu_ms_per_sample": round(statistics.median(cpu), 3) if cpu else None,
                "rounds": [[round(r, 1), None if c is None else round(c, 3)] for r, c in rounds],
            })  # fmt: skip
    one = next(r for r in runs if r["variant"] == "current" and r["workers"] == 0)
    per_core = 1000 / one["cpu_ms_per_sample"]
    result = {
        "benchmark": "loader_224",
        "label": args.label or _git(),
        "compared": str(args.compare) if args.compare else None,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {load:.1f} before the runs",
        "python": platform.python_version(),
        "image_size": 224,
        "batch": args.batch,
        "pairs": args.pairs,
        "batches_per_round": args.batches,
        "runs": runs,
        "one_core_samples_per_s": round(per_core, 1),
        "h100_step_samples_per_s": H100_STEP,
        "workers_to_keep_up": math.ceil(H100_STEP / per_core),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
