"""Benchmark: a ViT-B/16-size GrowCLIP training step on a GPU, samples/s and MFU (issue #9).

One step = forward + symmetric InfoNCE loss + backward + AdamW, under bf16 autocast (weights, grads and
optimizer state stay float32), with the kernels ``model/kernels.py`` picks (apex when importable, else
torch's fused AdamW; flash attention through ``F.scaled_dot_product_attention``), eager and with
``torch.compile``. Optionally the same step of open_clip's CLIP on the same architecture (when
``open_clip`` imports), eager, for comparison.

MFU (model FLOPs utilisation) = ``ArchSpec.flops_per_sample()`` × samples/s / peak dense bf16 FLOP/s.
``flops_per_sample`` is forward + backward (3 × forward), matmuls only, last block counted in full
(our pooled last block skips part of it, so the FLOPs actually executed are a little lower: printed as
"executed"). The peak is the datasheet dense bf16 figure of the GPU (H100 SXM / H200: 989.4 TFLOP/s;
H100 PCIe: 756 TFLOP/s; A100: 312 TFLOP/s); the measured peak of a large bf16 matmul on the same GPU
is printed beside it as a second reference.

Timing: ``--warmup`` untimed steps (compilation included), then ``--steps`` steps between two
synchronisations; samples/s = batch × steps / seconds. Memory: ``torch.cuda.max_memory_allocated``
over the timed steps.

Usage::

    python benchmarks/gpu_step.py [--device cuda] [--spec vitb16] [--batch 256] [--compile off|on|both]
    python benchmarks/gpu_step.py --device cpu --spec tiny --batch 8 --steps 2 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from train_step import BENCH, Runner, make_open_clip, make_ours, peak_mib, random_batch, reset_peak

from model import kernel_report
from model.spec import TINY, VIT_B16, ArchSpec, block_macs

SPECS = {"vitb16": VIT_B16, "bench": BENCH, "tiny": TINY}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, datasheet


def datasheet_peak(name: str) -> float | None:
    """Dense bf16 TFLOP/s of the GPU called ``name`` (first matching key), None if unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def pooled_saving_per_sample(spec: ArchSpec) -> int:
    """Training FLOPs per sample that the pooled last block does not execute (3 × 2 × skipped MACs)."""
    skipped = 0
    for tower, tokens in ((spec.image, spec.image.num_patches + 1), (spec.text, spec.text.context_length)):
        d, m = tower.width, tower.mlp_width
        full = block_macs(d, m, tokens)
        pooled = tokens * 2 * d * d + (d * d + d * d + 2 * d * m) + 2 * tokens * d  # k,v all rows; rest one row
        skipped += full - pooled
    return 3 * 2 * skipped


def measured_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 n×n×n matmul rate (random data, mean of ``reps`` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def time_runner(
    runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int, device: torch.device
) -> dict[str, float]:
    """Warm up (compile), then time ``steps`` steps between two synchronisations."""
    t0 = time.perf_counter()
    for i in range(warmup):
        runner.step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    start = reset_peak(device)
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(runner.step(*batches[i % len(batches)]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    loss = torch.stack(losses)
    if not torch.isfinite(loss).all():
        raise RuntimeError(f"{runner.name}: non-finite loss {loss.tolist()}")
    peak = peak_mib(device)
    return {
        "step_s": secs / steps,
        "warmup_s": warm_s,
        "peak_mib": peak,
        "start_mib": start,
        "last_loss": loss[-1].item(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--spec", choices=sorted(SPECS), default="vitb16")
    ap.add_argument("--batch", type=int, nargs="+", default=[256], help="one or more batch sizes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--open-clip", action="store_true", help="also time open_clip's CLIP (eager), if importable")
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    spec = SPECS[args.spec]
    amp = torch.bfloat16 if args.amp == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast (loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name)
        measured = measured_matmul_tflops(device)
    else:
        name, peak, measured = "cpu", None, None
    flops = spec.flops_per_sample()
    executed = flops - pooled_saving_per_sample(spec)
    print(f"device {name}; torch {torch.__version__}; kernels {kernel_report(device)}")
    print(
        f"spec {args.spec}: {spec.params() / 1e6:.2f}M params; flops_per_sample {flops / 1e9:.1f} GFLOP "
        f"(executed with the pooled last block: {executed / 1e9:.1f})"
    )
    if measured is not None:
        print(f"peak bf16: datasheet {peak} TFLOP/s; measured 8192^3 bf16 matmul {measured:.0f} TFLOP/s")

    plan: list[tuple[str, bool, Any]] = []
    if args.compile in ("off", "both"):
        plan.append(("ours", False, make_ours))
    if args.compile in ("on", "both"):
        plan.append(("ours+compile", True, make_ours))
    if args.open_clip:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            print("open_clip not importable: skipped")
        else:
            plan.append(("open_clip", False, make_open_clip))

    results: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "spec": args.spec,
        "flops_per_sample": flops,
        "executed_flops_per_sample": executed,
        "peak_tflops_datasheet": peak,
        "peak_tflops_measured_matmul": measured,
        "runs": [],
    }
    rows = []
    for batch in args.batch:
        batches = [random_batch(spec, batch, device, seed=s) for s in range(4)]
        for label, comp, make in plan:
            runner = make(spec, device, comp, amp=amp, name=label)
            try:
                r = time_runner(runner, batches, args.warmup, args.steps, device)
            except torch.OutOfMemoryError:
                print(f"{label} batch {batch}: out of memory, skipped")
                del runner
                torch.cuda.empty_cache()
                continue
            sps = batch / r["step_s"]
            mfu = flops * sps / (peak * 1e12) if peak else None
            hfu = executed * sps / (peak * 1e12) if peak else None
            row = {"model": label, "batch": batch, "samples_per_s": sps, "mfu": mfu, "executed_fu": hfu, **r}
            results["runs"].append(row)
            rows.append(row)
            print(
                f"{label} batch {batch}: {r['step_s'] * 1e3:.1f} ms/step, {sps:.0f} samples/s, "
                f"MFU {'-' if mfu is None else f'{mfu:.1%}'}, peak {r['peak_mib']:.0f} MiB, "
                f"warm-up {r['warmup_s']:.0f} s",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(
        f"\n| model | batch | ms/step | samples/s | MFU ({peak} TFLOP/s) | executed-FLOP util. | peak MiB | warm-up s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        hfu = "-" if row["executed_fu"] is None else f"{row['executed_fu']:.1%}"
        print(
            f"| {row['model']} | {row['batch']} | {row['step_s'] * 1e3:.1f} | {row['samples_per_s']:.0f} | {mfu} | "
            f"{hfu} | {row['peak_mib']:.0f} | {row['warmup_s']:.0f} |"
        )
    return results


if __name__ == "__main__":
    main()
