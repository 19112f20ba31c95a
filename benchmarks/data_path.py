"""Benchmark: does the data path keep up with the training step? (issue #9, demo config)

Measures, for the run config (default ``configs/demo.yaml``):

- **loader**: samples/s of ``data_tools.loaders.make_train_loader`` (shard read, JPEG decode, random
  resized crop, tokenize, collate) exactly as the training job builds it (stages 1..S with replay,
  shuffle buffer, augmentation, held-out split), for each ``--workers`` count. ``num_workers=0``
  runs in this process: that is the rate of ONE worker. The first ``--skip`` batches (worker start,
  shuffle-buffer fill) are not timed.
- **step**: samples/s the training step consumes: forward + loss + backward + grad clip + optimizer
  step of the config's stage-1 model (the smallest, so the fastest consumer: the loader's worst
  case; grown models at later stages consume more slowly), with the config's batch size and
  optimizer, built as the training job builds it.

The loader keeps up when one worker's rate exceeds the step's consumption; the ratio is printed
last. Both run on the same machine, one after the other (on the 2-core machines a worker shares the
cores with the step, so the margin needs to be large).

The corpus must exist: ``.venv/bin/python -m data_tools build-offline data/offline --pairs-per-stage 1000
--image-size 32 --vocab-size 2048`` (~20 s), or ``make demo``.

Usage::

    .venv/bin/python benchmarks/data_path.py [--config configs/demo.yaml] [--workers 0 1 2] [--batches 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_tools.loaders import make_train_loader
from jobs.config import load_cfg
from model import ClipLoss, build_model, make_optimizer, param_groups


def _loader(cfg: Any, workers: int) -> Any:
    spec = cfg.model
    return make_train_loader(
        cfg.data.root,
        range(1, cfg.data.stages + 1),
        batch_size=cfg.train.batch_size,
        image_size=spec.image.image_size,
        context_length=spec.text.context_length,
        replay=cfg.data.replay_fraction,
        seed=cfg.data.seed,
        num_workers=workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=True,
        val_fraction=cfg.data.val_fraction,
    )


def loader_rate(cfg: Any, workers: int, batches: int, skip: int) -> dict[str, float]:
    """Samples/s of the training loader with ``workers`` DataLoader workers (after ``skip`` batches)."""
    loader = _loader(cfg, workers)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(skip):
        next(it)
    t_first = time.perf_counter() - t_start
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _tokens = next(it)
        n += images.shape[0]
    secs = time.perf_counter() - t0
    del it, loader
    return {"samples_per_s": n / secs, "skipped_s": t_first, "samples": n}


def step_rate(cfg: Any, steps: int, warmup: int, workers: int | None = None) -> dict[str, float]:
    """Samples/s of the training step of the config's stage-1 model (batch = train.batch_size).

    ``workers=None``: fresh random batches made outside the timed region (the step alone); else the
    batches come from the training loader with that many workers, fetched inside the timed region
    (the step as the job runs it: waiting on data shows up here).
    """
    spec, tc = cfg.model, cfg.train
    model = build_model(spec, seed=tc.seed).train()
    opt = make_optimizer(
        param_groups(model, tc.weight_decay), tc.optimizer, tc.lr, tuple(tc.betas), tc.eps, tc.weight_decay, "cpu"
    )
    loss_fn = ClipLoss()
    b = tc.batch_size
    g = torch.Generator().manual_seed(0)
    it = iter(_loader(cfg, workers)) if workers is not None else None
    times = []
    for i in range(warmup + steps):
        if it is None:  # a fresh batch every step: a repeated one is memorised and its tiny gradients go denormal
            images = torch.randn(b, 3, spec.image.image_size, spec.image.image_size, generator=g)
            tokens = torch.randint(1, spec.text.vocab_size - 1, (b, spec.text.context_length), generator=g)
            tokens[:, -1] = spec.text.vocab_size - 1
        t0 = time.perf_counter()
        if it is not None:
            images, tokens = next(it)
        loss = loss_fn(*model(images, tokens))
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"samples_per_s": b / med, "step_s_median": med, "params": spec.params()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches per worker count")
    ap.add_argument("--skip", type=int, default=3, help="untimed loader batches first (worker start, buffer fill)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    cfg = load_cfg(args.config, args.overrides)
    if not (Path(cfg.data.root) / "manifest.json").exists():
        raise SystemExit(
            f"no corpus at {cfg.data.root}: build it with `.venv/bin/python -m data_tools build-offline "
            f"{cfg.data.root} --pairs-per-stage 1000 --image-size 32 --vocab-size 2048`"
        )
    print(
        f"config {args.config}: batch {cfg.train.batch_size}, image {cfg.model.image.image_size}, "
        f"context {cfg.model.text.context_length}, stages 1..{cfg.data.stages}, data {cfg.data.root}; "
        f"{platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    step = step_rate(cfg, args.steps, warmup=3)
    print(
        f"step, stage-1 model ({step['params'] / 1e6:.2f}M params): {step['samples_per_s']:.0f} samples/s", flush=True
    )
    fed = step_rate(cfg, args.steps, warmup=3, workers=cfg.data.num_workers)
    print(f"step fed by the loader (num_workers={cfg.data.num_workers}): {fed['samples_per_s']:.0f} samples/s")
    loaders = {}
    for w in args.workers:
        loaders[w] = loader_rate(cfg, w, args.batches, args.skip)
        print(f"loader, num_workers={w}: {loaders[w]['samples_per_s']:.0f} samples/s", flush=True)

    print("\n| what | samples/s |")
    print("|---|---:|")
    print(f"| training step, stage-1 model, batch {cfg.train.batch_size} | {step['samples_per_s']:.0f} |")
    print(f"| same step fed by the loader, num_workers={cfg.data.num_workers} | {fed['samples_per_s']:.0f} |")
    for w, r in loaders.items():
        label = "1 worker, in-process (num_workers=0)" if w == 0 else f"num_workers={w}"
        print(f"| loader, {label} | {r['samples_per_s']:.0f} |")
    per_worker = loaders[min(loaders)]["samples_per_s"] / max(min(loaders), 1)
    ratio = per_worker / step["samples_per_s"]
    result = {"step": step, "step_fed": fed, "loaders": loaders, "loader_per_worker_over_step": ratio}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\nloader samples/s per worker / step samples/s: {ratio:.2f}x (> 1: the loader keeps up)")
    return result


if __name__ == "__main__":
    main()
