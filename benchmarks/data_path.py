"""Benchmark: does the data path keep up with the training step? (issue #9, demo config)

Measures, for the run config (default ``configs/demo.yaml``):

- **loader**: samples/s of ``data_tools.loaders.make_train_loader`` (shard read, JPEG decode, random
  resized crop, tokenize, batch + normalise) exactly as the training job builds it (stages 1..S with
  replay, shuffle buffer, augmentation, held-out split), for each ``--workers`` count. ``num_workers=0``
  runs in this process: that is the rate of ONE worker. The first ``--skip`` batches (worker start,
  shuffle-buffer fill) are not timed.
- **step**: samples/s the training step consumes: forward + loss + backward + grad clip + optimizer
  step of the config's stage-1 model (the smallest, so the fastest consumer: the loader's worst
  case; grown models at later stages consume more slowly), with the config's batch size and
  optimizer, built as the training job builds it; fresh random batches made outside the timed region.
- **fed step**: the same step taking its batches from the training loader with the config's
  ``num_workers`` inside the timed region (waiting on data shows up here).

Alternating rounds: every round times the step, then each loader, then the fed step, all built once
and kept warm, so a neighbour's load on a shared machine hits them alike. Each figure is the median
over rounds; the ratio printed last (one worker's samples/s over the step's) is the median of the
per-round ratios. The loader keeps up when one worker's rate exceeds the step's consumption; on the
2-core machines a worker shares the cores with the step, so the margin needs to be large.

The corpus must exist: ``.venv/bin/python -m data_tools build-offline data/offline --pairs-per-stage 1000
--image-size 32 --vocab-size 2048`` (~20 s), or ``make demo``.

Usage::

    .venv/bin/python benchmarks/data_path.py [--config configs/demo.yaml] [--workers 0 1 2] [--rounds 5]
        [--batches 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
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


class Step:
    """The training step of the config's stage-1 model (batch = train.batch_size), built once."""

    def __init__(self, cfg: Any) -> None:
        spec, tc = cfg.model, cfg.train
        self.spec, self.tc = spec, tc
        self.model = build_model(spec, seed=tc.seed).train()
        self.opt = make_optimizer(
            param_groups(self.model, tc.weight_decay),
            tc.optimizer,
            tc.lr,
            tuple(tc.betas),
            tc.eps,
            tc.weight_decay,
            "cpu",
        )
        self.loss_fn = ClipLoss()
        self.gen = torch.Generator().manual_seed(0)

    def _random_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # a fresh batch every step: a repeated one is memorised and its tiny gradients go denormal
        b, spec = self.tc.batch_size, self.spec
        images = torch.randn(b, 3, spec.image.image_size, spec.image.image_size, generator=self.gen)
        tokens = torch.randint(1, spec.text.vocab_size - 1, (b, spec.text.context_length), generator=self.gen)
        tokens[:, -1] = spec.text.vocab_size - 1
        return images, tokens

    def run(self, steps: int, batches: Iterator[Any] | None = None) -> float:
        """Median seconds per step over ``steps`` steps; with ``batches``, fetching the batch is timed too."""
        times = []
        for _ in range(steps):
            if batches is None:
                images, tokens = self._random_batch()
            t0 = time.perf_counter()
            if batches is not None:
                images, tokens = next(batches)
            loss = self.loss_fn(*self.model(images, tokens))
            loss.backward()
            if self.tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def loader_rate(it: Iterator[Any], batches: int) -> float:
    """Samples/s of ``batches`` batches taken from a warm loader iterator."""
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _tokens = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (step, loaders, fed step)")
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches per worker count per round")
    ap.add_argument("--skip", type=int, default=3, help="untimed loader batches first (worker start, buffer fill)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per round (alone and fed)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first (alone and fed)")
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
        f"{platform.machine()}, torch threads {torch.get_num_threads()}, {args.rounds} rounds"
    )
    b = cfg.train.batch_size
    step = Step(cfg)
    step.run(args.warmup)
    fed_workers = cfg.data.num_workers
    fed_it = iter(_loader(cfg, fed_workers))
    step.run(args.warmup, fed_it)
    loader_its = {}
    for w in args.workers:
        loader_its[w] = it = iter(_loader(cfg, w))
        for _ in range(args.skip):
            next(it)
    rates: dict[str, list[float]] = {"step": [], "fed": [], **{f"loader{w}": [] for w in args.workers}}
    for rnd in range(args.rounds):
        rates["step"].append(b / step.run(args.steps))
        for w, it in loader_its.items():
            time.sleep(0.2)  # let idle workers of the other loaders refill their prefetch queues first
            rates[f"loader{w}"].append(loader_rate(it, args.batches))
        time.sleep(0.2)
        rates["fed"].append(b / step.run(args.steps, fed_it))
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    w0 = min(args.workers)
    ratios = [r / max(w0, 1) / s for r, s in zip(rates[f"loader{w0}"], rates["step"], strict=True)]
    ratio = statistics.median(ratios)

    print("\n| what | samples/s (median of rounds) | min–max |")
    print("|---|---:|---:|")

    def row(label: str, key: str) -> None:
        print(f"| {label} | {med[key]:.0f} | {min(rates[key]):.0f}–{max(rates[key]):.0f} |")

    row(f"training step alone, stage-1 model, batch {b}", "step")
    for w in args.workers:
        row(f"loader, {'one worker in-process (num_workers=0)' if w == 0 else f'num_workers={w}'}", f"loader{w}")
    row(f"step fed by the loader, num_workers={fed_workers}", "fed")
    result = {
        "rounds": rates,
        "median": med,
        "loader_per_worker_over_step": ratio,
        "params": cfg.model.params(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\nloader samples/s per worker / step samples/s (median of rounds): {ratio:.2f}x (> 1: the loader keeps up)")
    return result


if __name__ == "__main__":
    main()
