"""``python -m jobs <verb>``: the command line of the GrowCLIP job suite.

Only verbs that work are registered: the stage pipeline (``plan``, ``submit``, ``status``, ``cancel``, ``autopilot``),
offline analysis (``report``, ``runs``), the per-job entry points the sbatch scripts call
(``search-candidate``, ``select``, ``train``, ``evaluate``), ``submit-train``, ``export`` (to open_clip) and the checks
(``check-config``, ``doctor``).
Exit codes: 0 success, 1 the job ran and failed, 2 bad input (config, arguments) — the
message on stderr names the problem and the fix; ``train`` and ``search-candidate`` also return 3
when preempted (checkpointed, re-run to resume). Verbs that need torch import it lazily, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_tools.cli_errors import EXIT_FAILED, EXIT_USAGE, OneLineParser, fail, unexpected
from jobs.config import EXECUTORS, ConfigError, dump_cfg, load_cfg

__all__ = ["main", "build_parser"]

EXIT_OK = 0


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
        if cfg.data.tokenizer != "corpus" or (cfg.data.root / "tokenizer.json").exists():  # it must fit the model
            from jobs.engine.data import check_tokenizer

            check_tokenizer(cfg.data.root, cfg.model.text.vocab_size, cfg.data.tokenizer)
    except ConfigError as exc:
        return fail(exc, EXIT_USAGE)
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
    parser = OneLineParser(
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

    p = verbs.add_parser(
        "train",
        help="train one stage (single process, torchrun or srun tasks); checkpoints, resume, eval at the end",
        description="Train stage T of the run config on D_<=T into RUN_DIR/stage_NN/train (see jobs/README.md). "
        "Resumes from the newest verified checkpoint; SIGUSR2 checkpoints and exits 3.",
    )
    _add_train_args(p)
    p.add_argument(
        "--resume",
        default="latest",
        metavar="latest|none|CKPT",
        help="latest (default): newest verified checkpoint of the stage, else a fresh start; none: refuse to "
        "reuse a run dir with checkpoints; CKPT: that checkpoint",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation of final.pt")
    p.set_defaults(func=_lazy("jobs.train", "cmd_train"))

    p = verbs.add_parser(
        "submit-train",
        help="submit `train` through submitit (SLURM, local or debug); requeued and resumed on USR2/timeout",
        description="Submit one stage training as a submitit Checkpointable; print the job id.",
    )
    _add_train_args(p)
    p.add_argument("--executor", choices=EXECUTORS, help="override cluster.executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.set_defaults(func=_lazy("jobs.submit_train", "cmd_submit_train"))

    p = verbs.add_parser(
        "evaluate",
        help="zero-shot classification + retrieval of a checkpoint on DATA_ROOT/eval (JSON out)",
        description="Evaluate CKPT on every eval task: acc1/acc5/mean per-class recall, retrieval R@k.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a step_*.pt or final.pt")
    p.add_argument("--data-root", type=Path, required=True, help="corpus with eval/ and tokenizer.json")
    p.add_argument("--out", type=Path, help="write the JSON here (atomically); default: stdout")
    p.add_argument("--weights", choices=("model", "ema"), default="model", help="trained weights or their EMA")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="eval settings (default: the checkpoint's eval section), e.g. --set eval.tasks=[mnist]",
    )
    p.add_argument(
        "--task-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also evaluate this CLIP_benchmark webdataset folder as published (test/nshards.txt, test/0.tar ...; "
        "repeatable); folders under DATA_ROOT/eval are found without it",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FILE",
        help="the tokenizer.json the run trained with, or its folder (default: the run dir's, found from the "
        "checkpoint's path, else DATA_ROOT's; checked against the checkpoint's hash)",
    )
    p.add_argument(
        "--clip-benchmark-dir",
        type=Path,
        metavar="DIR",
        help="write each task's result in CLIP_benchmark's JSON here (default: clip_benchmark/ beside --out)",
    )
    p.set_defaults(func=_lazy("jobs.evaluate", "cmd_evaluate"))
    _add_export_verb(verbs)
    _add_pipeline_verbs(verbs)
    return parser


def _add_export_verb(verbs: Any) -> None:
    p = verbs.add_parser(
        "export",
        help="write a checkpoint as a folder open_clip loads (create_model_and_transforms('local-dir:DIR'))",
        description="Export CKPT's weights, its config (our image size, mean/std, bicubic resize) and the run's "
        "tokenizer (the same token ids) as an open_clip local-dir folder, atomically. A model open_clip cannot "
        "express (a shared cross-modal encoder) is refused.",
    )
    p.add_argument(
        "--checkpoint", type=Path, required=True, metavar="CKPT", help="a step_*.pt, final.pt or selected.pt"
    )
    p.add_argument("--format", choices=("open_clip",), default="open_clip", help="open_clip (default): open-clip-torch")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to create (new or empty)")
    p.add_argument(
        "--weights",
        choices=("ema", "raw", "model"),
        help="ema: the weights' moving average, what released CLIP weights usually are (default when the "
        "checkpoint has one); raw (or model, as in `evaluate --weights`): the trained weights (default otherwise)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FILE",
        help="the tokenizer.json the run trained with, or its folder (default: the run dir's, else the corpus's; "
        "checked against the checkpoint's hash)",
    )
    p.add_argument("--force", action="store_true", help="replace DIR when it holds an earlier export")
    p.set_defaults(func=_lazy("jobs.export", "cmd_export"))


def _add_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="the run's resolved config, RUN_DIR/config.yaml")
    p.add_argument("--stage", type=_positive_int, required=True, help="growth stage T (>= 2: stage 1 has no search)")
    p.add_argument("--run-dir", type=Path, required=True, help="RUN_DIR (RUN_ROOT/<run>)")


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="run config YAML, e.g. configs/demo.yaml")
    p.add_argument("--run-dir", type=Path, help="RUN_DIR (default: run_root/name of the config)")
    p.add_argument("--stages", metavar="A-B|A,B", help="stages to run, e.g. 2-3 (default: all of data.stages)")
    p.add_argument("--executor", choices=EXECUTORS, help="override cluster.executor")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable); the resolved config is saved as RUN_DIR/config.yaml",
    )


def _add_pipeline_verbs(verbs: Any) -> None:
    p = verbs.add_parser(
        "plan",
        help="dry run of `submit`: per stage the steps to run or skip, candidates, resources, sbatch equivalents",
        description="Show what `submit` would do with this config and run dir; submits and writes nothing.",
    )
    _add_submit_args(p)
    p.set_defaults(func=_lazy("jobs.submit", "cmd_plan"))

    p = verbs.add_parser(
        "submit",
        help="run the growth plan: per stage search array -> select -> train -> evaluate (afterok chains on SLURM)",
        description="Submit (slurm: all at once, chained by dependencies, returns at once) or run (local/debug: "
        "waits) every unfinished step of the selected stages. Finished work is skipped, partial work resumes, "
        "jobs of this run still queued are reused. RUN_DIR/lock keeps a second submitter off the run.",
    )
    _add_submit_args(p)
    p.add_argument("--break-lock", action="store_true", help="remove a stale RUN_DIR/lock (its process is gone)")
    p.add_argument("--wait", action="store_true", help="slurm: wait until this run's jobs have left the queue")
    p.set_defaults(func=_lazy("jobs.submit", "cmd_submit"))

    p = verbs.add_parser(
        "autopilot",
        help="growth on autopilot: crawls landing in autopilot.inbox are ingested once, and when the data grew by "
        "autopilot.min_growth the next stage is made and its chain submitted",
        description="slurm: submit a small recurring poll job (it re-submits itself every autopilot.poll_s; "
        "returns at once). local/debug: poll in the foreground until interrupted. Each poll ingests new complete "
        "crawls, follows the stage in flight (resubmitting a failed one up to autopilot.retries times), and makes "
        "the next stage when the trigger is reached. State and events: RUN_DIR/autopilot/.",
    )
    p.add_argument("--config", type=Path, required=True, help="run config YAML with an autopilot section")
    p.add_argument("--run-dir", type=Path, help="RUN_DIR (default: run_root/name of the config)")
    p.add_argument("--executor", choices=EXECUTORS, help="override cluster.executor")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="resume growth paused after a stage failed too often")
    p.add_argument("--stop", action="store_true", help="stop the autopilot (cancels its queued poll job)")
    p.add_argument("--once", action="store_true", help="local/debug: one poll, then exit")
    p.add_argument("--break-lock", action="store_true", help="remove a stale RUN_DIR/lock (its process is gone)")
    p.set_defaults(func=_lazy("jobs.autopilot", "cmd_autopilot"))

    for verb, fn, text in (
        ("status", "cmd_status", "each stage's steps (run dir + squeue/sacct), candidates and winner"),
        ("cancel", "cmd_cancel", "cancel this run's queued/running jobs (ids recorded in RUN_DIR/jobs.json) only"),
    ):
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("run_dir", type=Path, help="RUN_DIR of a submitted run")
        p.set_defaults(func=_lazy("jobs.submit", fn))

    p = verbs.add_parser(
        "report",
        help="offline run report: per-stage/search/growth tables, plots, comparison of runs (md|html|json|csv)",
        description="Read run dirs only (no model is run; finished, running or failed runs). Without --out: the "
        "per-stage summary of one run on stdout. With --out DIR: tables (architecture, params, FLOPs, wall time, "
        "estimated GPU-hours, losses, zero-shot, retrieval; search; growth events; kernels), PNG plots, and for "
        "several runs a side-by-side comparison including metrics at equal compute.",
    )
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="one or more runs (RUN_ROOT/<run>)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the report here (created if missing)")
    p.add_argument(
        "--format",
        choices=("md", "html", "json", "csv"),
        help="md (default): report.md + plots/*.png; html: one self-contained page; json: everything "
        "machine-readable; csv: stages/search/growth/kernels(/compare).csv",
    )
    p.set_defaults(func=_lazy("jobs.report", "cmd_report"))

    p = verbs.add_parser(
        "runs",
        help="one line per run under RUN_ROOT: name, stages done/planned, state, last update",
        description="List the runs under RUN_ROOT with their state (finished, running, queued, failed, incomplete) "
        "from their run dirs, lock, and squeue/sacct when reachable.",
    )
    p.add_argument("run_root", type=Path, metavar="RUN_ROOT", help="directory holding run dirs, e.g. runs")
    p.set_defaults(func=_lazy("jobs.report", "cmd_runs"))

    p = verbs.add_parser(
        "search-candidate",
        help="grow candidate K of stage T with PIM, train it search.steps, score it -> cand_KK/result.json",
        description="One search array task (what slurm/search_array.sbatch runs with --index $SLURM_ARRAY_TASK_ID). "
        "Skips a candidate whose result.json exists; an index beyond the stage's candidates exits 0.",
    )
    _add_stage_args(p)
    p.add_argument(
        "--index", type=int, required=True, help="array task id: candidate K in round 1, the K-th survivor later"
    )
    p.add_argument("--round", type=_positive_int, default=1, help="search round (search.rounds > 1; default 1)")
    p.set_defaults(func=_lazy("jobs.stage_jobs", "cmd_search_candidate"))

    p = verbs.add_parser(
        "oracle",
        help="grade stage T's search: train every candidate fully, evaluate, write stage_TT/oracle/summary.json",
        description="Train every finished search candidate of stage T exactly as the winner's full training (same "
        "steps, data, replay, seed, grown start) as one array task each, evaluate them, and write the search's "
        "Kendall tau and regret to RUN_DIR/stage_TT/oracle/summary.json. Never changes the run's own results; "
        "re-running skips finished candidates.",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="RUN_DIR of a run whose stage T has been selected")
    p.add_argument("--stage", type=_positive_int, required=True, help="growth stage T (>= 2)")
    p.add_argument("--executor", choices=EXECUTORS, help="override cluster.executor")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the oracle and print its table")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="cluster.KEY=VALUE",
        help="override a launch setting (cluster.*; train.val_every=N records learning curves of held-out loss "
        "for the estimator study, docs/fidelity.md); the training itself is the run's",
    )
    p.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="with train.val_every: also record the held-out loss of an EMA of the weights (decay DECAY; "
        "it never changes the trained weights)",
    )
    p.set_defaults(func=_lazy("jobs.oracle_jobs", "cmd_oracle"))

    p = verbs.add_parser(
        "fidelity",
        help="grade search estimators on stage T's oracle learning curves -> stage_TT/oracle/fidelity.json",
        description="Kendall tau and regret of each estimator (held-out loss, EMA, power-law extrapolation) "
        "per budget, and successive halving replayed on the curves with its overhead (docs/fidelity.md). Needs "
        "an oracle run with --set train.val_every=N.",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="RUN_DIR whose stage T has oracle curves")
    p.add_argument("--stage", type=_positive_int, required=True, help="growth stage T (>= 2)")
    p.add_argument("--budgets", default="20,50,100,200,400", help="steps at which to grade (default %(default)s)")
    p.add_argument(
        "--halving",
        action="append",
        default=[],
        metavar="STEPS,KEEP,ROUNDS",
        help="a successive-halving schedule to replay (repeatable), e.g. 50,0.5,3",
    )
    p.set_defaults(func=_lazy("jobs.oracle_jobs", "cmd_fidelity"))

    p = verbs.add_parser(
        "select",
        help="rank stage T's candidates by score; write selected.json (table, reason) and selected.pt",
        description="Rank the finished candidates (lower score wins); fails when fewer than "
        "search.min_successful finished.",
    )
    _add_stage_args(p)
    p.add_argument(
        "--round", type=_positive_int, help="rank this search round (default: the last: write selected.json)"
    )
    p.set_defaults(func=_lazy("jobs.stage_jobs", "cmd_select"))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="run config YAML, e.g. configs/demo.yaml")
    p.add_argument("--stage", type=_positive_int, required=True, help="growth stage T (trains on D_<=T)")
    p.add_argument("--run-dir", type=Path, required=True, help="RUN_DIR (RUN_ROOT/<run>); writes stage_NN/train")
    p.add_argument("--init", type=Path, help="start a fresh training from this checkpoint's weights and ArchSpec")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=100",
    )


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A verb handler imported on use (torch is heavy; --help and check-config do not need it)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:  # bad input a verb did not report itself
        return fail(exc, EXIT_USAGE)
    except Exception as exc:  # never a traceback: one line (the traceback with GROWCLIP_TRACEBACK=1)
        return unexpected(exc, f"python -m jobs {args.verb}")
