"""``python -m jobs <verb>``: the command line of the GrowCLIP job suite.

Only verbs that work are registered; later issues add ``plan``, ``submit``, ``status``, ``train``,
``evaluate``, ``report`` here. Exit codes: 0 success, 1 the job ran and failed, 2 bad input
(config, arguments) — the message on stderr names the problem and the fix.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.config import ConfigError, dump_cfg, load_cfg

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run config YAML, e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.lr=1e-4 --set model.image.depth=4",
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    """Load, validate and print the resolved config."""
    try:
        cfg = load_cfg(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(dump_cfg(cfg))
    return EXIT_OK


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print what this machine offers the suite: packages, kernels, accelerator, SLURM."""
    import torch

    from model import kernels, tv_guard

    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (cuda available: {torch.cuda.is_available()})"),
        ("torchvision", f"{_version('torchvision')} ({tv_guard.STATUS})"),
    ]
    rows += [(d, _version(d)) for d in ("timm", "submitit", "webdataset", "transformers", "tokenizers", "h5py")]
    rows += [(f"kernel {k}", v) for k, v in kernels.kernel_report().items()]
    sinfo = shutil.which("sinfo")
    rows.append(("slurm", sinfo or "not found (see slurm/local/README.md to run one on this machine)"))
    rows.append(("SLURM_CONF", os.environ.get("SLURM_CONF", "(unset)")))
    ok = True
    if sinfo:
        proc = subprocess.run([sinfo, "-h", "-o", "%P %a %D %t"], capture_output=True, text=True, timeout=20)
        state = proc.stdout.strip().replace("\n", "; ") if proc.returncode == 0 else proc.stderr.strip()[:200]
        rows.append(("slurm partitions", state or "(none)"))
        ok = proc.returncode == 0
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK if ok or not args.strict else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs",
        description="GrowCLIP job suite: CLIP that grows with its data, run as SLURM batch jobs.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "check-config",
        help="validate a run config and print it resolved (exit 2 on error)",
        description="Load FILE, apply --set overrides, validate every section and print the resolved YAML.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_check_config)

    p = verbs.add_parser(
        "doctor",
        help="show package versions, kernels (apex or torch), accelerator and SLURM reachability",
        description="Report what this machine offers: packages, fused kernels, CUDA, SLURM.",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when SLURM is installed but not answering")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)
