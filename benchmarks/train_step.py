"""Benchmark: one CLIP training step (forward + backward + AdamW) of GrowCLIP against open_clip (issue #9).

Both models are built on the identical architecture (``BENCH`` below: image 64/8, width 256, depth 6,
heads 4, MLP ×4; text context 32, vocab 8192, width 256, depth 6, heads 4; embed 256; no shared
encoder), trained with the symmetric InfoNCE loss with a learnable logit scale (each project's own
``ClipLoss``) and AdamW with the same hyper-parameters and the same decay/no-decay split, on the same
random batches, in one process with the same thread count. The runs alternate (ours, open_clip,
open_clip, ours, ...) in rounds, so a neighbour's load on a shared machine hits both alike; warm-up
steps (and compilation) are excluded. The ratio printed last is the median over rounds of
``step time open_clip / step time ours`` (> 1: ours is faster).

Fairness checks printed before timing:

- parameter counts of both modules (open_clip is built with ``no_ln_pre=True`` and a patch embedding
  with bias, which is exactly our architecture; the counts must be equal);
- the loss of open_clip after loading OUR weights (key mapping in :func:`load_ours_into_open_clip`)
  against our loss on the same batch: the two modules compute the same function.

open_clip (``open-clip-torch``) is a test dependency (the export round trip, tests/test_export.py),
pinned in constraints.txt beside the CPU torch: ``make venv`` installs it.

Memory: on CPU the process's peak RSS (``VmHWM``, reset before each measured phase through
/proc/self/clear_refs); on CUDA ``torch.cuda.max_memory_allocated``. Both models live in the same
process, so each peak includes the other model's resident weights and optimizer state.

Usage::

    .venv/bin/python benchmarks/train_step.py [--rounds 10] [--steps 1] [--warmup 2] [--compile off|on|both]
        [--ablate] [--threads N] [--device cpu|cuda] [--spec bench|tiny]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model import ClipLoss, build_model, kernel_report, make_optimizer, param_groups
from model.export_open_clip import to_open_clip_state_dict
from model.spec import TINY, ArchSpec, ImageSpec, SharedSpec, TextSpec

BENCH = ArchSpec(
    image=ImageSpec(image_size=64, patch_size=8, width=256, depth=6, heads=4, mlp_ratio=4.0),
    text=TextSpec(vocab_size=8192, context_length=32, width=256, depth=6, heads=4, mlp_ratio=4.0),
    shared=SharedSpec(width=256, depth=0, heads=4),
    embed_dim=256,
)
SPECS = {"bench": BENCH, "tiny": TINY}
OPTIM = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2}  # CLIP's AdamW settings


# --- memory -------------------------------------------------------------------------------------


def _status_mib(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(name)


def reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; return the memory in use now (MiB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # return freed heap pages to the OS so "start" counts live data only (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # writing 5 resets VmHWM (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def peak_mib(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak` (MiB): max_memory_allocated on CUDA, VmHWM on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


# --- data ---------------------------------------------------------------------------------------


def random_batch(spec: ArchSpec, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B,3,H,W) ~ N(0,1) and captions (B,L): ids in [1, V-2], EOT = V-1 (highest id), 0-padded."""
    g = torch.Generator().manual_seed(seed)
    im, tx = spec.image, spec.text
    images = torch.randn(batch, 3, im.image_size, im.image_size, generator=g)
    tokens = torch.randint(1, tx.vocab_size - 1, (batch, tx.context_length), generator=g)
    lengths = torch.randint(2, tx.context_length + 1, (batch,), generator=g)  # EOT position + 1
    pos = torch.arange(tx.context_length)
    tokens[pos >= lengths[:, None]] = 0
    tokens[torch.arange(batch), lengths - 1] = tx.vocab_size - 1
    return images.to(device), tokens.to(device)


# --- the two models -----------------------------------------------------------------------------


@dataclass
class Runner:
    """One model + optimizer + loss; ``step`` does forward, backward and the optimizer step."""

    name: str
    model: torch.nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: int
    optimizer_impl: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads) per step
    peak_mib: float = 0.0
    start_mib: float = 0.0
    compile_s: float = 0.0
    done: int = 0  # steps run so far: picks the next batch, so every model sees the same sequence

    def next_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        self.done += 1
        return self.step(*batches[(self.done - 1) % len(batches)])


def _make_step(
    forward: Callable[..., Any],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    amp: torch.dtype | None,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            img, txt, scale = forward(images, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return loss.detach()

    return step


def make_ours(
    spec: ArchSpec,
    device: torch.device,
    compile_model: bool,
    amp: torch.dtype | None = None,
    name: str = "ours",
    pooled_last_block: bool = True,
    plain_adamw: bool = False,
) -> Runner:
    """GrowCLIP as the training job builds it: build_model, param_groups, make_optimizer, ClipLoss.

    ``pooled_last_block=False`` and ``plain_adamw=True`` switch off one optimisation each (ablations):
    the last block then runs on every row, and the optimizer is torch's default (unfused) AdamW.
    """
    model = build_model(spec, seed=0).to(device).train()
    for tower in (model.visual, model.text, model.shared):
        if tower is not None:
            tower.pooled_last_block = pooled_last_block
    if plain_adamw:
        opt: torch.optim.Optimizer = torch.optim.AdamW(param_groups(model, OPTIM["weight_decay"]), **OPTIM)
        impl = "torch.optim.AdamW (defaults)"
    else:
        opt = make_optimizer(param_groups(model, OPTIM["weight_decay"]), "adamw", device=device, **OPTIM)
        impl = kernel_report(device)["adamw"]
    forward = torch.compile(model, dynamic=False) if compile_model else model
    n = sum(p.numel() for p in model.parameters())
    return Runner(name, model, _make_step(forward, ClipLoss(), opt, amp, device), n, impl)


def make_open_clip(
    spec: ArchSpec, device: torch.device, compile_model: bool, amp: torch.dtype | None = None, name: str = "open_clip"
) -> Runner:
    """open_clip's CLIP on the same architecture, with open_clip_train's decay split and plain AdamW.

    ``no_ln_pre=True`` drops the pre-transformer LayerNorm we do not have, and the patch convolution
    gets a bias as ours has (open_clip's has none): the two modules then have the same parameters.
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    im, tx = spec.image, spec.text
    vision = CLIPVisionCfg(
        layers=im.depth,
        width=im.width,
        head_width=im.width // im.heads,
        mlp_ratio=im.mlp_ratio,
        patch_size=im.patch_size,
        image_size=im.image_size,
        no_ln_pre=True,
    )
    text = CLIPTextCfg(
        context_length=tx.context_length,
        vocab_size=tx.vocab_size,
        width=tx.width,
        heads=tx.heads,
        layers=tx.depth,
        mlp_ratio=tx.mlp_ratio,
    )
    model = open_clip.CLIP(embed_dim=spec.embed_dim, vision_cfg=vision, text_cfg=text)
    conv = model.visual.conv1
    model.visual.conv1 = torch.nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, bias=True)
    torch.nn.init.zeros_(model.visual.conv1.bias)
    model = model.to(device).train()

    # open_clip_train/main.py: no weight decay on gains, biases, norms and the logit scale
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": OPTIM["weight_decay"]},
    ]
    opt = torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"])
    forward = torch.compile(model, dynamic=False) if compile_model else model

    def clamp_scale() -> None:  # open_clip_train clamps the logit scale after every step
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    n = sum(p.numel() for p in model.parameters())
    step = _make_step(forward, open_clip.ClipLoss(), opt, amp, device, after_step=clamp_scale)
    return Runner(name, model, step, n, "torch.optim.AdamW (defaults)")


def load_ours_into_open_clip(ours: torch.nn.Module, oc: torch.nn.Module) -> None:
    """Copy GrowCLIP's weights into open_clip's CLIP (strict): proves the two compute one function.

    The mapping is ``jobs export``'s (``model/export_open_clip.py``), which folds our patch-embedding bias
    into the positions; the bias this benchmark gives open_clip's patch convolution (equal parameter
    counts) therefore stays zero.
    """
    sd = to_open_clip_state_dict(ours.state_dict(), ours.spec)
    sd["visual.conv1.bias"] = torch.zeros_like(oc.visual.conv1.bias)
    oc.load_state_dict(sd, strict=True)


# --- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, device: torch.device) -> None:
    """Run ``steps`` untimed steps (the first compiles, when compiling); records compile+warm-up time."""
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.next_step(batches)
    _sync(device)
    runner.compile_s = time.perf_counter() - t0


def timed_round(
    runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, device: torch.device
) -> float:
    """Run ``steps`` timed steps; append each step's seconds to ``runner.times``; return the round mean."""
    start = reset_peak(device)
    t_round = []
    for _ in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = runner.next_step(batches)
        _sync(device)
        t_round.append(time.perf_counter() - t0)
        runner.cpu_times.append(time.process_time() - c0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{runner.name}: non-finite loss {loss.item()}")
    runner.peak_mib = max(runner.peak_mib, peak_mib(device))
    runner.start_mib = max(runner.start_mib, start)
    runner.times.extend(t_round)
    return statistics.fmean(t_round)


def fairness_check(spec: ArchSpec, device: torch.device) -> dict[str, float]:
    """Our loss and open_clip's loss on one batch with OUR weights loaded into open_clip."""
    ours = make_ours(spec, device, compile_model=False)
    oc = make_open_clip(spec, device, compile_model=False)
    load_ours_into_open_clip(ours.model, oc.model)
    import open_clip

    images, tokens = random_batch(spec, 8, device, seed=123)
    ours.model.eval()
    oc.model.eval()
    with torch.no_grad():
        a = ClipLoss()(*ours.model(images, tokens))
        b = open_clip.ClipLoss()(*oc.model(images, tokens))
    return {
        "params_ours": ours.params,
        "params_open_clip": oc.params,
        "loss_ours": a.item(),
        "loss_open_clip": b.item(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", choices=sorted(SPECS), default="bench")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds (ours, open_clip)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--distinct", type=int, default=8, help="distinct random batches, cycled")
    ap.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile both models (on), neither (off), or time eager and compiled variants of both (both)",
    )
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also time ours with one optimisation off each: the full last block, and unfused AdamW",
    )
    ap.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SPECS[args.spec]

    fair = fairness_check(spec, device)
    print(f"params: ours {fair['params_ours']:,}  open_clip {fair['params_open_clip']:,}  spec {spec.params():,}")
    print(
        f"loss with identical weights: ours {fair['loss_ours']:.6f}  open_clip {fair['loss_open_clip']:.6f}  "
        f"|diff| {abs(fair['loss_ours'] - fair['loss_open_clip']):.2e}"
    )
    if fair["params_ours"] != fair["params_open_clip"]:
        raise SystemExit("parameter counts differ: the comparison would not be fair")

    variants = [False, True] if args.compile == "both" else [args.compile == "on"]
    runners: list[Runner] = []
    for comp in variants:
        tag = "+compile" if comp else ""
        runners.append(make_ours(spec, device, comp, name=f"ours{tag}"))
        runners.append(make_open_clip(spec, device, comp, name=f"open_clip{tag}"))
        if args.ablate:
            runners.append(make_ours(spec, device, comp, name=f"ours{tag} (full last block)", pooled_last_block=False))
            runners.append(make_ours(spec, device, comp, name=f"ours{tag} (unfused AdamW)", plain_adamw=True))

    # distinct batches, the same sequence for every model: a repeated batch gets memorised, and the tiny
    # gradients of a memorised batch go denormal, which is slow on CPUs
    batches = [random_batch(spec, args.batch, device, seed=s) for s in range(args.distinct)]
    for r in runners:
        warm_up(r, batches, args.warmup, device)

    per_round: dict[str, list[float]] = {r.name: [] for r in runners}
    for rnd in range(args.rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]  # alternate who goes first
        for r in order:
            per_round[r.name].append(timed_round(r, batches, args.steps, device))

    print(
        f"\ndevice: {device} ({platform.processor() or platform.machine()}), threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, batch {args.batch}, {args.rounds} rounds × {args.steps} steps, "
        f"warm-up {args.warmup}"
    )
    print("| model | optimizer | step s (median) | samples/s | CPU s/step | peak MiB | peak − start MiB | warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    result: dict[str, Any] = {"fairness": fair, "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for r in runners:
        med, cpu = statistics.median(r.times), statistics.median(r.cpu_times)
        print(
            f"| {r.name} | {r.optimizer_impl} | {med:.3f} | {args.batch / med:.1f} | {cpu:.2f} | {r.peak_mib:.0f} | "
            f"{r.peak_mib - r.start_mib:.0f} | {r.compile_s:.1f} |"
        )
        result["runs"][r.name] = {
            "step_s_median": med,
            "samples_per_s": args.batch / med,
            "cpu_s_per_step_median": cpu,
            "peak_mib": r.peak_mib,
            "peak_minus_start_mib": r.peak_mib - r.start_mib,
            "warmup_s": r.compile_s,
            "round_means": per_round[r.name],
        }

    def ratio(a: str, b: str) -> float:
        return statistics.median(tb / ta for ta, tb in zip(per_round[a], per_round[b], strict=True))

    lines = []
    for comp in variants:
        tag = "+compile" if comp else ""
        if args.ablate:
            for variant in ("full last block", "unfused AdamW"):
                name = f"ours{tag} ({variant})"
                lines.append((f"{name}/open_clip{tag}", ratio(name, f"open_clip{tag}")))
        if args.compile == "both" and comp:
            lines.append(("ours+compile/ours (eager)", ratio("ours+compile", "ours")))
            lines.append(("ours+compile/open_clip (eager)", ratio("ours+compile", "open_clip")))
    for comp in variants:
        tag = "+compile" if comp else ""
        lines.append((f"ours{tag}/open_clip{tag}", ratio(f"ours{tag}", f"open_clip{tag}")))
    result["ratios"] = dict(lines)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print()
    for label, value in lines:  # speed-up = open_clip step time / our step time, median over rounds
        print(f"speed-up {label}: {value:.3f}x")
    return result


if __name__ == "__main__":
    main()
