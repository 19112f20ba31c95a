"""Benchmark: time and peak memory of growing a ViT-B/16-size GrowCLIP (issue #3, growth operators).

Grows image 224/16 width 768 depth 12 heads 12 + text width 512 depth 12 heads 8 (vocab 49408,
context 77, embed 512) by +2 blocks in each tower and the shared encoder from depth 0 to 2 (width 768,
so the growth is exact), and prints one markdown table row per phase.

Memory: on CPU the process's peak RSS during each phase (``VmHWM`` from /proc/self/status, reset
before each phase through /proc/self/clear_refs); on CUDA ``torch.cuda.max_memory_allocated``, reset
before each phase. "peak − start" is what the phase added on top of what was already alive.
tracemalloc is not used: it does not see torch's C++ allocations.

Usage::

    python benchmarks/grow_vitb16.py [--device cpu|cuda] [--no-measure] [--optimizer]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from train_step import peak_mib, reset_peak  # benchmarks/ is sys.path[0] when run as a script

from model import (
    build_model,
    grow,
    grow_optimizer_state,
    grow_state_dict,
    param_groups,
)
from model.pim import preservation_error
from model.spec import VIT_B16

# Shared width 768 >= both tower widths, so growing the shared encoder from depth 0 is exact.
OLD = VIT_B16.with_changes(shared={"width": 768, "heads": 12})
NEW = OLD.with_changes(image={"depth": 14}, text={"depth": 14}, shared={"depth": 2})


def _phase(name: str, fn: Callable[[], Any], device: torch.device, rows: list[tuple[str, float, float, float]]) -> Any:
    start = reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    peak = peak_mib(device)
    rows.append((name, secs, peak, peak - start))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-measure", action="store_true", help="skip the float64 preservation check")
    ap.add_argument("--optimizer", action="store_true", help="also map a real AdamW state")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    rows: list[tuple[str, float, float, float]] = []

    old = _phase("build_model(old) + init", lambda: build_model(OLD).to(device), device, rows)
    sd = old.state_dict()
    fresh = _phase("build_model(new) + init (θ_fresh)", lambda: build_model(NEW).to(device), device, rows)
    fill = fresh.state_dict()
    _phase(
        "grow_state_dict, fill given (operators only)", lambda: grow_state_dict(sd, OLD, NEW, fill=fill), device, rows
    )
    fresh = fill = None  # free before the next phases
    new, record = _phase("grow(momentum=1.0) total, no check", lambda: grow(old, NEW, measure=False), device, rows)
    _phase("grow(momentum=0.5) total, no check", lambda: grow(old, NEW, momentum=0.5, measure=False), device, rows)
    if not args.no_measure:
        err = _phase("preservation check (float64, B=2)", lambda: preservation_error(old, new, NEW), device, rows)
    if args.optimizer:
        opt = torch.optim.AdamW(param_groups(old, 0.1), lr=1e-4)
        for p in old.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        state = opt.state_dict()
        groups = param_groups(new, 0.1)
        _phase(
            "grow_optimizer_state (AdamW)",
            lambda: grow_optimizer_state(state, OLD, NEW, new_names=groups),
            device,
            rows,
        )

    print(f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}; params {OLD.params() / 1e6:.2f}M -> {NEW.params() / 1e6:.2f}M")
    ops = ", ".join(f"{o['op']} {o['tower']} {o['from']}->{o['to']}" for o in record.ops)
    print(f"ops: {ops}")
    if not args.no_measure:
        print(f"preservation error (max abs): {err}")
    print()
    print("| phase | seconds | peak MiB | peak − start MiB |")
    print("|---|---:|---:|---:|")
    for name, secs, peak, extra in rows:
        print(f"| {name} | {secs:.2f} | {peak:.0f} | {extra:.0f} |")


if __name__ == "__main__":
    main()
