"""Benchmark: streaming evaluation of an ImageNet-sized zero-shot task on CPU (issue #18).

Builds a synthetic task in CLIP_benchmark's webdataset layout, as its exporter writes one (keys
``s0000000``..., lossless webp, shards of 10,000: ``test/0.tar ... test/4.tar``, ``test/nshards.txt``,
``classnames.txt``, ``zeroshot_classification_templates.txt``): 50,000 images of 224 px, 1000 classes,
80 templates (ImageNet-1k validation's shape). The pixels come from a pool of ``--pool`` distinct images
(encoding 50,000 webps would take ~45 min here); every sample is still decoded on its own. A second task,
``wds_synthetic_10k``, is the first shard alone (symlinked), to show the peak does not grow with the task.

Then ``python -m jobs evaluate --task-dir ...`` runs, as a user would, on a small random GrowCLIP at
224 px (patch 32, width 64, depth 2; its own tokenizer, trained on a tiny synthetic corpus), once per task,
and the script reports each run's wall time and peak RSS (the child's ``ru_maxrss``: with ``eval.workers``
0, the default, the only process). Loading the 50,000 images whole as float32, as evaluation did before,
is 50,000 x 3 x 224 x 224 x 4 B = 30.1 GB by calculation.

Usage (heavy: ~0.5 GB of shards, minutes of CPU; be nice to neighbours)::

    nice -n 10 .venv/bin/python benchmarks/eval_stream.py [--root /tmp/growclip-eval-stream] [--images 50000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ("a photo of", "a blurry photo of", "a close-up photo of", "a bright photo of", "a cropped photo of",
            "a drawing of", "a rendering of", "a painting of", "a sculpture of", "a pixelated photo of")  # fmt: skip
SUFFIXES = ("a {c}.", "the {c}.", "my {c}.", "one {c}.", "a large {c}.", "a small {c}.", "a clean {c}.", "a dirty {c}.")


def _image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth synthetic picture (gradients and three ellipses): compresses like a photo, not like noise."""
    x = np.linspace(0, 1, size)
    a, b, c = rng.random(3)
    red = 255 * (a * x[None, :] + (1 - a) * x[:, None])
    green = 255 * np.abs(np.sin(6 * b * x[None, :] + 3 * c * x[:, None]))
    blue = np.full((size, size), 255 * c)
    img = Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size * 4 // 5, 2))
        w, h = (int(v) for v in rng.integers(size // 10, size // 3, 2))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def build_task(folder: Path, images: int, classes: int, size: int, pool: int, per_shard: int) -> None:
    """The task as CLIP_benchmark's exporter writes it (PIL lossless webp, ShardWriter "%d.tar", max 10,000)."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(pool):
        buf = io.BytesIO()
        _image(rng, size).save(buf, format="webp", lossless=True)
        encoded.append(buf.getvalue())
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(images):
            sink.write({"__key__": f"s{i:07d}", "webp": encoded[i % pool], "cls": i % classes})
        shards = sink.shard
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("".join(f"object number {c}\n" for c in range(classes)))
    templates = [f"{p} {s}" for p in PREFIXES for s in SUFFIXES]
    (folder / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in templates))


def build_model_and_tokenizer(root: Path, size: int) -> Path:
    """DATA_ROOT with a tokenizer (trained on a tiny synthetic corpus) and a checkpoint of a small random model."""
    from data_tools.imaging import ImageOptions
    from data_tools.ingest import ingest
    from data_tools.synthetic import make_table_input
    from data_tools.tokenizer import load_tokenizer, train_tokenizer
    from jobs.engine.checkpoint import FORMAT, VERSION, save_checkpoint
    from model.clip import build_model
    from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec

    data = root / "data"
    if not (data / "tokenizer.json").exists():
        ingest(make_table_input(root / "pairs", 50, seed=0), "table", data, opts=ImageOptions(image_size=32))
        train_tokenizer(data, vocab_size=1000)
    spec = ArchSpec(
        image=ImageSpec(image_size=size, patch_size=32, width=64, depth=2, heads=2),
        text=TextSpec(vocab_size=load_tokenizer(data).get_vocab_size(), context_length=32, width=64, depth=2, heads=2),
        shared=SharedSpec(width=64, depth=0, heads=2),
        embed_dim=64,
    )
    model = build_model(spec, seed=0)
    ckpt = root / "final.pt"
    save_checkpoint({"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "model": model.state_dict()}, ckpt)
    return data


def evaluate(root: Path, data: Path, task: Path, batch_size: int) -> dict[str, float]:
    """``python -m jobs evaluate --task-dir TASK``: wall time, the child's peak RSS, its result."""
    out = root / f"eval_{task.name}.json"
    cmd = [sys.executable, "-m", "jobs", "evaluate", "--checkpoint", str(root / "final.pt"), "--data-root", str(data),
           "--task-dir", str(task), "--out", str(out), "--set", f"eval.batch_size={batch_size}"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak (getrusage(CHILDREN) keeps the max of all)
    wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    row = json.loads(out.read_text())["tasks"][task.name]
    return {
        "task": task.name,
        "images": row["count"],
        "wall_s": round(wall, 1),
        "images_per_s": round(row["count"] / wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "acc1": row["acc1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/growclip-eval-stream"), help="work folder (kept)")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--pool", type=int, default=500, help="distinct images the samples cycle through")
    p.add_argument("--per-shard", type=int, default=10_000, help="CLIP_benchmark's exporter default max count")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    big = args.root / "wds_synthetic"
    t0 = time.time()
    if not (big / "test" / "nshards.txt").exists():
        build_task(big, args.images, args.classes, args.size, args.pool, args.per_shard)
    small = args.root / "wds_synthetic_10k"
    if not (small / "test" / "nshards.txt").exists():
        (small / "test").mkdir(parents=True, exist_ok=True)
        (small / "test" / "0.tar").symlink_to(big / "test" / "0.tar")
        (small / "test" / "nshards.txt").write_text("1\n")
        for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
            (small / name).write_text((big / name).read_text())
    data = build_model_and_tokenizer(args.root, args.size)
    built = time.time() - t0
    shards = sum(f.stat().st_size for f in (big / "test").glob("*.tar"))
    print(f"built in {built:.0f} s: {big} ({shards / 2**20:.0f} MiB of shards)", flush=True)
    rows = [evaluate(args.root, data, task, args.batch_size) for task in (small, big)]
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0))}
    print(json.dumps({"machine": info, "runs": rows}, indent=2))
    print("\n| task | images | wall s | CPU s | images/s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = (r["task"], f"{r['images']:,}", r["wall_s"], r["cpu_s"], r["images_per_s"], r["peak_rss_mib"])
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
