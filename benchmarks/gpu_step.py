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

Variants (``--variants``, replaces the ``--compile`` plan): names joined by ``+``:

- ``eager`` / ``compile`` (``torch.compile``, default mode, as ``train.compile``) / ``maxat``
  (``torch.compile(mode="max-autotune-no-cudagraphs")``: Triton GEMM templates with fused epilogues;
  long compile);
- ``bf16res``: ``GrowCLIP.low_precision_residual = True`` (the residual stream between blocks in the
  autocast dtype instead of float32; what ``train.bf16_residual``, default true, sets in training);
- ``cudnnbench``: ``torch.backends.cudnn.benchmark = True`` (patch-embedding convolution).

``--jsonl`` appends every row as one JSON line as soon as it is measured (a run cut off by a time limit
keeps what it measured); ``--profile N`` profiles N steps of the first variant of the first batch with
``torch.profiler`` and prints the CUDA time by kernel class (GEMM, attention, Triton/elementwise, other).

Usage::

    python benchmarks/gpu_step.py [--device cuda] [--spec vitb16] [--batch 256] [--compile off|on|both]
    python benchmarks/gpu_step.py --batch 512 --variants compile+bf16res compile --jsonl out.jsonl
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
from train_step import (
    BENCH,
    OPTIM,
    Runner,
    _make_step,
    make_open_clip,
    make_ours,
    peak_mib,
    random_batch,
    reset_peak,
)

from model import ClipLoss, build_model, kernel_report, make_optimizer, param_groups
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


VARIANT_PARTS = ("eager", "compile", "maxat", "bf16res", "cudnnbench")


def parse_variant(name: str) -> set[str]:
    """``"compile+bf16res"`` -> {"compile", "bf16res"}; unknown parts raise."""
    parts = set(name.split("+"))
    unknown = parts - set(VARIANT_PARTS)
    if unknown:
        raise SystemExit(f"--variants {name}: unknown part(s) {sorted(unknown)}; known: {', '.join(VARIANT_PARTS)}")
    return parts


def make_variant(spec: ArchSpec, device: torch.device, name: str, amp: torch.dtype | None) -> Runner:
    """GrowCLIP as the training job builds it (build_model, param_groups, make_optimizer, ClipLoss), per variant."""
    parts = parse_variant(name)
    if "cudnnbench" in parts:
        torch.backends.cudnn.benchmark = True
    model = build_model(spec, seed=0).to(device).train()
    model.low_precision_residual = "bf16res" in parts
    opt = make_optimizer(param_groups(model, OPTIM["weight_decay"]), "adamw", device=device, **OPTIM)
    if "maxat" in parts:
        forward = torch.compile(model, dynamic=False, mode="max-autotune-no-cudagraphs")
    elif "compile" in parts:
        forward = torch.compile(model, dynamic=False)
    else:
        forward = model
    n = sum(p.numel() for p in model.parameters())
    return Runner(name, model, _make_step(forward, ClipLoss(), opt, amp, device), n, kernel_report(device)["adamw"])


def variant_factory(
    spec: ArchSpec, device: torch.device, compile_model: bool, amp: torch.dtype | None = None, name: str = "compile"
) -> Runner:
    """:func:`make_variant` with ``make_ours``'s signature (the variant is the runner's name)."""
    return make_variant(spec, device, name, amp)


def kernel_class(name: str) -> str:
    """Coarse class of a CUDA kernel name for the profile summary."""
    low = name.lower()
    if any(k in low for k in ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "matmul", "mm_")):
        return "gemm"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if low.startswith("triton"):
        return "triton (fused elementwise/reductions)"
    if "adam" in low or "multi_tensor" in low:
        return "optimizer"
    if "conv" in low or "cudnn" in low or "implicit" in low:
        return "conv"
    return "other (eager elementwise, copies, ...)"


def profile_runner(runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, path: Path | None):
    """Profile ``steps`` warm steps; print CUDA ms per step by kernel class and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            runner.step(*batches[i % len(batches)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        kernels.append((us, evt.count, evt.key))
        totals[kernel_class(evt.key)] = totals.get(kernel_class(evt.key), 0.0) + us
    kernels.sort(reverse=True)
    lines = [f"profile of {runner.name}, {steps} steps: CUDA ms per step by class"]
    lines += [f"  {k}: {v / 1e3 / steps:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines.append(f"  total: {sum(totals.values()) / 1e3 / steps:.1f}")
    lines.append("top kernels (ms per step, calls per step, name):")
    lines += [f"  {us / 1e3 / steps:7.2f} {n / steps:5.0f}  {key[:140]}" for us, n, key in kernels[:40]]
    text = "\n".join(lines)
    print(text, flush=True)
    if path is not None:
        path.write_text(text + "\n")


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
    ap.add_argument("--variants", nargs="+", help="variant names (module docstring); replaces --compile's plan")
    ap.add_argument("--jsonl", type=Path, help="append each measured row to this file as a JSON line")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps of the first variant (CUDA only)")
    ap.add_argument("--profile-out", type=Path, help="write the profile summary here too")
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
    for variant in args.variants or []:
        parse_variant(variant)
        plan.append((variant, False, variant_factory))
    if not args.variants and args.compile in ("off", "both"):
        plan.append(("ours", False, make_ours))
    if not args.variants and args.compile in ("on", "both"):
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
            except Exception as exc:  # a variant that fails to compile/run must not stop the others
                print(f"{label} batch {batch}: failed, skipped: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                del runner
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            sps = batch / r["step_s"]
            mfu = flops * sps / (peak * 1e12) if peak else None
            hfu = executed * sps / (peak * 1e12) if peak else None
            row = {"model": label, "batch": batch, "samples_per_s": sps, "mfu": mfu, "executed_fu": hfu, **r}
            if args.jsonl:
                with args.jsonl.open("a") as fh:
                    fh.write(json.dumps({"device": name, "torch": torch.__version__, "spec": args.spec, **row}) + "\n")
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
            if args.profile and device.type == "cuda" and len(rows) == 1:
                profile_runner(runner, batches, args.profile, args.profile_out)
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
