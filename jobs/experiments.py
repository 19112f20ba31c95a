"""The experiment suite of issue #8: GrowCLIP vs fixed architectures and its ablations, at small scale.

``python -m jobs.experiments run`` trains every experiment of ``configs/experiments/suite.yaml`` (base
config + ``--set`` overrides, once per seed) through the normal pipeline (``python -m jobs submit ...
--wait`` in a subprocess per run, so each run is exactly what a user would launch), ``--jobs`` runs
at a time; runs that need another run's outcome (``model_from``, ``match_compute``) wait for it.
Finished runs are skipped and unfinished ones resume (the pipeline is idempotent), so the command can
be repeated after an interruption. ``python -m jobs.experiments configs`` only writes the resolved
configs; ``python -m jobs.experiments summarize`` writes docs/results.md's tables from the run dirs.

Run dirs: ROOT/<experiment>_s<seed>/, resolved configs ROOT/configs/<experiment>_s<seed>.yaml, logs
ROOT/logs/<experiment>_s<seed>.log (ROOT = --root, default runs/experiments).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from data_tools.atomic import atomic_write_text
from data_tools.cli_errors import fail
from jobs.config import ConfigError, RunCfg, dump_cfg, load_cfg, read_yaml
from jobs.engine.rundir import OracleSummary, RunDir, read_json, read_record
from jobs.logs import setup_logging
from model.spec import ArchSpec

__all__ = ["Experiment", "RunSpec", "load_suite", "total_compute", "resolve_run", "main"]

logger = logging.getLogger("jobs.experiments")

SUITE = Path("configs/experiments/suite.yaml")


@dataclass(frozen=True)
class Experiment:
    """One entry of the suite: overrides of the base config and what it derives from other runs."""

    name: str
    about: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    model_from: str | None = None
    match_compute: str | None = None
    oracle_of: str | None = None  # trains nothing of its own: the oracle (jobs oracle) of that run's stages 2..last

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(x for x in (self.model_from, self.match_compute, self.oracle_of) if x))


@dataclass(frozen=True)
class RunSpec:
    """One (experiment, seed) run."""

    exp: Experiment
    seed: int
    base: Path

    @property
    def name(self) -> str:
        return f"{self.exp.name}_s{self.seed}"

    @property
    def deps(self) -> tuple[str, ...]:
        """The runs (same seed) this one derives from."""
        return tuple(f"{d}_s{self.seed}" for d in self.exp.needs)


def load_suite(path: Path) -> tuple[Path, list[Experiment]]:
    """Parse suite.yaml (strictly: unknown keys, unknown references and bad seeds are errors)."""
    if not path.is_file():
        raise ConfigError(f"{path}: suite file not found; the default is {SUITE}")
    raw = read_yaml(path)
    unknown = set(raw) - {"base", "seeds", "experiments"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: base, seeds, experiments")
    base = path.parent / str(raw.get("base", "base.yaml"))
    default_seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    exps: list[Experiment] = []
    for name, entry in (raw.get("experiments") or {}).items():
        entry = entry or {}
        bad = set(entry) - {"about", "set", "seeds", "model_from", "match_compute", "oracle_of"}
        if bad:
            raise ConfigError(
                f"{path}: experiment {name}: unknown keys {sorted(bad)}; valid: about, set, seeds, model_from, "
                f"match_compute, oracle_of"
            )
        if entry.get("oracle_of") and set(entry) & {"set", "model_from", "match_compute"}:
            raise ConfigError(
                f"{path}: experiment {name}: oracle_of trains the candidates of another run as that run did; "
                "drop set/model_from/match_compute"
            )
        exps.append(
            Experiment(
                name=str(name),
                about=str(entry.get("about", "")),
                overrides=tuple(str(s) for s in entry.get("set", [])),
                seeds=tuple(int(s) for s in entry.get("seeds", default_seeds)),
                model_from=entry.get("model_from"),
                match_compute=entry.get("match_compute"),
                oracle_of=entry.get("oracle_of"),
            )
        )
    names = {e.name for e in exps}
    for e in exps:
        for ref in e.needs:
            if ref not in names:
                raise ConfigError(f"{path}: experiment {e.name} refers to unknown experiment {ref!r}")
            other = next(x for x in exps if x.name == ref)
            if missing := sorted(set(e.seeds) - set(other.seeds)):
                raise ConfigError(f"{path}: experiment {e.name} needs {ref} for seeds {missing}, which {ref} lacks")
            if other.needs:
                raise ConfigError(f"{path}: {e.name} -> {ref} -> {other.needs}: chains of derived runs are not allowed")
    return base, exps


def total_compute(run_dir: Path) -> dict[str, int]:
    """FLOPs a run spent: its search candidates' and its stage trainings' (the report tool's accounting)."""
    from jobs.engine.report import load_run

    stages = load_run(Path(run_dir))["stages"]
    search = sum(int(s.get("search_flops") or 0) for s in stages)
    train = sum(int(s.get("train_flops") or 0) for s in stages)
    return {"search_flops": search, "train_flops": train, "total_flops": search + train}


def _finished(cfg: RunCfg, run_dir: Path) -> bool:
    return RunDir(run_dir).stage(cfg.data.stages).eval_metrics.exists()


def _oracle_finished(cfg: RunCfg, run_dir: Path) -> bool:
    """Every growth stage of ``run_dir`` has an oracle summary without missing candidates."""
    for t in range(2, cfg.data.stages + 1):
        summary = read_record(OracleSummary, RunDir(run_dir).stage(t).oracle.summary_json)
        if summary is None or summary.missing:
            return False
    return True


def final_spec(run_dir: Path, stages: int) -> ArchSpec:
    """The architecture of a finished run's last stage."""
    spec_json = read_json(RunDir(run_dir).stage(stages).train.spec_json)
    if spec_json is None:
        raise RuntimeError(f"{run_dir}: stage {stages} has not trained yet")
    return ArchSpec.from_dict(spec_json)


def resolve_run(run: RunSpec, root: Path, extra: tuple[str, ...] = ()) -> RunCfg:
    """The run's config: base + experiment overrides + seed (+ derived model / steps from its references)."""
    if run.exp.oracle_of:  # the graded run's own config: the oracle trains as that run did
        graded = root / f"{run.exp.oracle_of}_s{run.seed}"
        if not RunDir(graded).config_yaml.is_file():
            raise RuntimeError(f"{graded} has not been submitted: run {run.exp.oracle_of} first")
        cfg = load_cfg(RunDir(graded).config_yaml)
        if not _finished(cfg, graded):
            raise RuntimeError(f"{graded} has not finished (no stage {cfg.data.stages} evaluation): run it first")
        return cfg
    cfg = load_cfg(run.base, [*run.exp.overrides, f"train.seed={run.seed}", *extra])
    cfg = replace(cfg, name=run.name, run_root=root)
    for ref in run.deps:  # derived from a run's outcome: it must be finished
        if not _finished(cfg, root / ref):
            raise RuntimeError(f"{root / ref} has not finished (no stage {cfg.data.stages} evaluation): run it first")
    if run.exp.model_from:
        cfg = replace(cfg, model=final_spec(root / f"{run.exp.model_from}_s{run.seed}", cfg.data.stages))
    if run.exp.match_compute:
        ref = root / f"{run.exp.match_compute}_s{run.seed}"
        budget = total_compute(ref)["total_flops"]
        if budget <= 0:
            raise RuntimeError(f"{ref}: no compute recorded yet; run {run.exp.match_compute} first")
        per_step = cfg.model.flops_per_sample() * cfg.train.batch_size * cfg.data.stages
        steps = max(cfg.train.warmup_steps, round(budget / per_step))
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))
        logger.info(
            "%s: %d steps per stage x %d stages = %.3g FLOPs, matching %s's %.3g (search + training)",
            run.name,
            steps,
            cfg.data.stages,
            steps * per_step,
            ref.name,
            budget,
        )
    return cfg


def _plan(base: Path, exps: list[Experiment], only: set[str], seeds: set[int] | None) -> list[RunSpec]:
    runs = []
    for e in exps:
        if only and e.name not in only:
            continue
        for s in e.seeds:
            if seeds is not None and s not in seeds:
                continue
            runs.append(RunSpec(e, s, base))
    return runs


ORACLE_EMA = 0.99  # the EMA whose held-out loss the oracle records (the "ema" estimator of jobs fidelity)
# successive-halving schedules (steps, keep, rounds) replayed on every oracle's curves besides the run's own
FIDELITY_HALVING = ("20,0.5,3", "50,0.5,3", "100,0.5,2", "100,0.34,2", "200,0.5,2")


def _launch(run: RunSpec, cfg: RunCfg, root: Path, threads: int) -> subprocess.Popen[bytes]:
    log = root / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    if run.exp.oracle_of:  # every growth stage of the graded run, one after the other
        graded = root / f"{run.exp.oracle_of}_s{run.seed}"
        # learning curves (held-out loss every log step, and an EMA's) grade the search estimators (jobs fidelity)
        curves = ["--set", f"train.val_every={cfg.train.log_every}", "--ema", str(ORACLE_EMA)]  # every 20 steps here
        sc = cfg.search
        halving = f"{sc.steps},{sc.keep:g},{sc.rounds}"
        steps = []
        for t in range(2, cfg.data.stages + 1):
            steps.append([sys.executable, "-m", "jobs", "oracle", "--run-dir", str(graded), "--stage", str(t), *curves])
            steps.append(
                [sys.executable, "-m", "jobs", "fidelity", "--run-dir", str(graded), "--stage", str(t)]
                + ["--halving", halving, *(a for h in FIDELITY_HALVING for a in ("--halving", h))]
            )
        cmd = ["sh", "-c", " && ".join(" ".join(step) for step in steps)]
    else:
        conf = root / "configs" / f"{cfg.name}.yaml"
        atomic_write_text(conf, dump_cfg(cfg))
        cmd = [sys.executable, "-m", "jobs", "submit", "--config", str(conf), "--run-dir", str(root / cfg.name)]
        cmd.append("--wait")
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def run_suite(runs: list[RunSpec], root: Path, jobs: int, threads: int, extra: tuple[str, ...]) -> int:
    """Run (or resume) every run, ``jobs`` at a time, each after the runs it derives from. Exit status."""
    t0 = time.time()
    done: dict[str, bool] = {}  # name -> succeeded
    pending = list(runs)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    failed: list[str] = []
    selected = {r.name for r in runs}
    while pending or running:
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            done[name] = proc.returncode == 0
            state = "finished" if done[name] else f"FAILED (exit {proc.returncode}; see {root}/logs/{name}.log)"
            logger.info("%s %s in %.0f s [%.0f s since start]", name, state, time.time() - started, time.time() - t0)
            if not done[name]:
                failed.append(name)
        for run in list(pending):
            if len(running) >= jobs:
                break
            inside = [d for d in run.deps if d in selected]  # others must be finished on disk already
            if any(d in done and not done[d] for d in inside):
                pending.remove(run)
                failed.append(run.name)
                logger.error("%s skipped: a run it derives from failed (%s)", run.name, ", ".join(run.deps))
                continue
            if not all(done.get(d) for d in inside):
                continue
            pending.remove(run)
            try:
                cfg = resolve_run(run, root, extra)
            except (ConfigError, RuntimeError, ValueError) as exc:
                failed.append(run.name)
                done[run.name] = False
                logger.error("%s: %s", run.name, exc)
                continue
            finished = (
                _oracle_finished(cfg, root / f"{run.exp.oracle_of}_s{run.seed}")
                if run.exp.oracle_of
                else _finished(cfg, root / run.name)
            )
            if finished:
                logger.info("%s already finished: skipped", run.name)
                done[run.name] = True
                continue
            logger.info("%s starting (%s)", run.name, run.exp.about or run.exp.name)
            running[run.name] = (_launch(run, cfg, root, threads), time.time())
        time.sleep(0.5 if running else 0)
    logger.info(
        "%d runs, %d failed, %.1f min in all%s",
        len(runs),
        len(failed),
        (time.time() - t0) / 60,
        f": {', '.join(failed)}" if failed else "",
    )
    return 1 if failed else 0


def _runs_from_args(args: argparse.Namespace) -> tuple[list[RunSpec], Path]:
    base, exps = load_suite(Path(args.suite))
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    only = set(args.only or [])
    unknown = only - {e.name for e in exps}
    if unknown:
        raise ConfigError(f"--only {sorted(unknown)}: not in {args.suite}; experiments: {[e.name for e in exps]}")
    return _plan(base, exps, only, seeds), Path(args.root)


def cmd_run(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.threads < 0:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1 and --threads={args.threads} >= 0")
    runs, root = _runs_from_args(args)
    logger.info("%d runs under %s, %d at a time: %s", len(runs), root, args.jobs, ", ".join(r.name for r in runs))
    return run_suite(runs, root, args.jobs, args.threads, tuple(args.set or ()))


def cmd_configs(args: argparse.Namespace) -> int:
    """Write (and validate) every resolvable run config; derived ones need their reference run finished."""
    runs, root = _runs_from_args(args)
    for run in runs:
        if run.exp.oracle_of:
            print(f"{run.name}: the oracle of {run.exp.oracle_of}_s{run.seed} (trains with that run's config)")
            continue
        try:
            cfg = resolve_run(run, root, tuple(args.set or ()))
        except RuntimeError as exc:
            print(f"{run.name}: not yet resolvable ({exc})")
            continue
        conf = root / "configs" / f"{run.name}.yaml"
        atomic_write_text(conf, dump_cfg(cfg))
        print(f"{run.name}: {conf}  steps/stage {cfg.train.steps}  params {cfg.model.params() / 1e6:.3f}M")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from jobs.engine.results import write_results

    runs, root = _runs_from_args(args)
    graded = [Path(g) for g in args.graded or ()]
    missing = [str(g) for g in graded if not (g / "config.yaml").is_file()]
    if missing:
        raise SystemExit(f"error: --graded {', '.join(missing)}: not a run dir (no config.yaml)")
    write_results(runs, root, Path(args.out), Path(args.plots), note=args.note, graded=graded)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.experiments", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, fn, help_ in (
        ("run", cmd_run, "train every experiment (resumes; skips finished runs)"),
        ("configs", cmd_configs, "write the resolved config of every run, train nothing"),
        ("summarize", cmd_summarize, "write docs/results.md from the run dirs"),
    ):
        q = sub.add_parser(verb, help=help_, description=help_)
        q.set_defaults(fn=fn)
        q.add_argument("--suite", default=str(SUITE), help=f"suite YAML (default {SUITE})")
        q.add_argument("--root", default="runs/experiments", help="where the run dirs go (default runs/experiments)")
        q.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments")
        q.add_argument("--seeds", default="", help="comma-separated seeds to run (default: each experiment's)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of all runs: train.steps=50")
        if verb == "run":
            q.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each uses cluster cpus)")
            q.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
        if verb == "summarize":
            q.add_argument("--out", default="docs/results.md", help="markdown file written (default docs/results.md)")
            q.add_argument("--plots", default="docs/results", help="folder of the figures (default docs/results)")
            q.add_argument("--note", default="", help="how the runs were made (machine, overrides), put in the page")
            q.add_argument(
                "--graded",
                action="append",
                metavar="RUN_DIR",
                help="also put this run's estimator grades (jobs fidelity) in the estimator tables, e.g. a study on"
                " another corpus (repeatable)",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        return fail(exc, 2)


if __name__ == "__main__":
    sys.exit(main())
