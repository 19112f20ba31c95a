"""``python -m jobs autopilot``: crawls land, the next stage is ingested, grown, trained and evaluated (issue #20).

One **poll** (:meth:`Autopilot.poll`, under RUN_DIR/lock) does, in order:

1. **Crawls**: every complete crawl folder of ``autopilot.inbox`` whose content is new is ingested on its own
   (``python -m data_tools ingest`` with ``autopilot.ingest_args``) into RUN_DIR/autopilot/staging/<id>/, so its
   pairs are counted (kept, dropped by reason) before they join a stage. A poll stops taking crawls at half of
   ``autopilot.time_min``; the rest wait for the next.
2. **The stage in flight** (at most one): finished once every stage up to it is evaluated; failed when it is not and
   none of its jobs is queued or running. A failed stage is resubmitted (only its missing work, as ``submit`` does)
   up to ``autopilot.retries`` times; then growth pauses until ``jobs autopilot --resume`` (crawls are still taken).
3. **The trigger** (nothing in flight, not paused; jobs/engine/autopilot.py): the waiting crawls' staged shards
   become DATA_ROOT's next stage in one ``ingest --no-reencode`` (dedupe across stages and crawls happens there),
   the run's ``data.stages`` is raised to it, and the stage's search -> select -> train -> evaluate chain is
   submitted (afterok). A corpus with stages the run has not finished (e.g. stage 1 ingested by hand) is caught up
   first.

Every step is recorded before and after it runs (state.json, atomic) and every ingest and submission is idempotent,
so a poll killed anywhere (preemption, requeue, ``scancel``) is completed by the next without repeating anything.

Executors: ``slurm`` — the poll is a small SLURM job that, when done, submits the next one ``--begin=now+poll_s``
(no busy waiting, no login-node process; ``--stop`` ends it, ``jobs cancel`` too); ``local``/``debug`` — polls in
the foreground, the stage chain run in place, until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit

from data_tools.atomic import atomic_write_text
from data_tools.cli_errors import fail
from jobs.config import ConfigError, RunCfg, dump_cfg, load_cfg, with_absolute_paths
from jobs.engine.autopilot import (
    Events,
    crawl_content_id,
    crawl_folders,
    crawl_signature,
    is_complete,
    load_state,
    pending_pairs,
    save_state,
    trigger,
)
from jobs.engine.pipeline import stage_state
from jobs.engine.rundir import RunDir, check_run_dir
from jobs.runlock import LockError, run_lock

__all__ = ["Autopilot", "AutopilotJob", "cmd_autopilot"]

logger = logging.getLogger(__name__)

# ingest options that say how to read a crawl; the staged shards are read without them
_INPUT_ARGS = ("--caption-col", "--image-col", "--separator", "--path-base")


def _image_args(ingest_args: tuple[str, ...]) -> list[str]:
    """``ingest_args`` without the options that read a crawl (each ``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for arg in ingest_args:
        if skip:
            skip = False
        elif arg in _INPUT_ARGS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _INPUT_ARGS)):
            out.append(arg)
    return out


def _data_tools(*args: str) -> tuple[int, str]:
    """``python -m data_tools ARGS`` in a child process: (exit code, its last stderr line)."""
    from jobs.cluster import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "data_tools", *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode:
        logger.warning("python -m data_tools %s: exit %d: %s", " ".join(args), proc.returncode, proc.stderr[-2000:])
    return proc.returncode, (lines[-1] if lines else "")


def _stage_entries(root: Path) -> list[dict[str, Any]]:
    from data_tools.manifest import load_manifest

    return list(load_manifest(root)["stages"]) if (root / "manifest.json").exists() else []


class Autopilot:
    """The autopilot of one run: ``Autopilot(cfg, cfg_path, run_dir, executor).poll()``."""

    def __init__(self, cfg: RunCfg, cfg_path: Path, run_dir: Path, executor: str) -> None:
        from jobs.cluster import get_cluster

        self.cfg, self.cfg_path, self.run_dir, self.kind = cfg, cfg_path, run_dir, executor
        self.ac = cfg.autopilot
        self.ad = RunDir(run_dir).autopilot
        self.events = Events(self.ad)
        self.cluster = get_cluster(executor)
        self.state = load_state(self.ad)

    def save(self) -> None:
        save_state(self.ad, self.state)

    # ------------------------------------------------------------------------------------------------ poll
    def poll(self) -> None:
        """One poll (see the module docstring); the caller holds RUN_DIR/lock."""
        start = time.time()
        self.state["last_poll"] = start
        self.take_crawls(deadline=start + 30 * self.ac.time_min)
        self.follow()
        if self.state["in_flight"] is None and not self.state["paused"]:
            self.grow()
        self.state["last_poll_end"] = time.time()
        self.save()

    # ---------------------------------------------------------------------------------------------- crawls
    def take_crawls(self, deadline: float) -> None:
        inbox = self.ac.inbox
        if not inbox.is_dir():
            self.events("inbox_missing", inbox=str(inbox))
            return
        folders = self.state.setdefault("folders", {})
        for crawl in crawl_folders(inbox):
            now = time.time()
            f = folders.get(crawl.name)
            if f is None:
                f = folders[crawl.name] = {"seen": now}
                self.events("crawl_seen", crawl=crawl.name)
            if f.get("done_sig") and f["done_sig"] == crawl_signature(crawl, self.ac.marker):
                continue  # handled, unchanged since
            why = is_complete(crawl, self.ac, f, now)
            if why is None:
                continue
            if time.time() > deadline:
                self.events("poll_time_up", crawl=crawl.name, note="left for the next poll")
                break
            self.take_crawl(crawl, f, why)
            self.save()

    def take_crawl(self, crawl: Path, f: dict[str, Any], why: str) -> None:
        sig = crawl_signature(crawl, self.ac.marker)
        cid = crawl_content_id(crawl, self.ac.marker)[:16]
        known = self.state["crawls"].get(cid)
        if known is not None:
            f.update(done_sig=sig, id=cid)
            if known.get("folder") != crawl.name:
                self.events("crawl_duplicate", crawl=crawl.name, same_as=known.get("folder"), id=cid)
            return
        self.events("crawl_complete", crawl=crawl.name, id=cid, why=why)
        staging = self.ad.staging(cid)
        rc, msg = _data_tools("ingest", "--input", str(crawl), "--format", "auto", "--data-root", str(staging),
                              "--stage", "1", *self.ac.ingest_args)  # fmt: skip
        entry: dict[str, Any] = {"folder": crawl.name, "ingested": time.time(), "stage": None}
        if rc == 0:
            (stage,) = _stage_entries(staging)
            src = stage["sources"][0]
            entry.update(status="staged", pairs=stage["count"], records=src["records"], drops=stage.get("drops", {}),
                         format=src["format"])  # fmt: skip
            self.events("crawl_ingested", crawl=crawl.name, id=cid, format=src["format"], pairs=stage["count"],
                        records=src["records"], drops=stage.get("drops", {}))  # fmt: skip
        elif rc in (1, 2):  # 1: it kept no pair; 2: not an input ingest can read
            entry.update(status="empty" if rc == 1 else "rejected", pairs=0, error=msg)
            self.events("crawl_ingested" if rc == 1 else "crawl_rejected", crawl=crawl.name, id=cid, pairs=0,
                        error=msg)  # fmt: skip
        else:  # killed or crashed: its journal resumes it at the next poll
            self.events("crawl_ingest_failed", crawl=crawl.name, id=cid, exit=rc, error=msg)
            return
        self.state["crawls"][cid] = entry
        f.update(done_sig=sig, id=cid)

    # ------------------------------------------------------------------------------------------- in flight
    def _evaluated(self, t: int) -> bool:
        cfg = replace(self.cfg, data=replace(self.cfg.data, stages=t))
        return all(stage_state(cfg, self.run_dir, s).evaluated for s in range(1, t + 1))

    def follow(self) -> None:
        t = self.state["in_flight"]
        if t is None:
            return
        st = self.state["stages"][str(t)]
        if self._evaluated(t):
            st["status"] = "finished"
            self.state["in_flight"] = None
            self.events("stage_finished", stage=t, attempts=st["attempts"])
            self.save()
            return
        if st["status"] == "launching":  # a poll stopped between recording the launch and making it
            self.launch(t)
            return
        if self.cluster.queues:
            live = [r.job_id for (s, _), recs in self.cluster.active(self.run_dir).items() if 1 <= s <= t for r in recs]
            if live:
                return
        if self.state["paused"]:
            return
        if st["attempts"] > self.ac.retries:
            self.state["paused"] = (
                f"stage {t} failed {st['attempts']} times (autopilot.retries={self.ac.retries}); see python -m jobs "
                f"status {self.run_dir}, fix the cause, then run python -m jobs autopilot ... --resume"
            )
            st["status"] = "failed"
            self.events("stage_failed", stage=t, attempts=st["attempts"], paused=True)
            self.events("paused", reason=self.state["paused"])
            self.save()
            return
        self.events("stage_failed", stage=t, attempts=st["attempts"], resubmit=True)
        st["attempts"] += 1
        self.launch(t)

    def launch(self, t: int) -> None:
        """Submit (or, locally, run) the missing work of stages 1..t with data.stages raised to t."""
        st = self.state["stages"][str(t)]
        st["status"] = "launching"
        self.state["in_flight"] = t
        self.save()
        cfg = replace(self.cfg, data=replace(self.cfg.data, stages=max(t, 1)))
        atomic_write_text(self.cfg_path, dump_cfg(cfg))  # the run's plan now reaches stage t
        stages = list(range(1, t + 1))
        if self.cluster.queues:
            from jobs.submit import submit_chained

            new = submit_chained(cfg, self.cfg_path, self.run_dir, stages, self.cluster)
            st["status"] = "submitted"
            self.events("stage_submitted", stage=t, attempt=st["attempts"], jobs=[r["job_id"] for r in new])
            self.save()
            return
        from jobs.submit import run_local

        st["status"] = "submitted"
        self.events("stage_submitted", stage=t, attempt=st["attempts"], jobs=[], executor=self.kind)
        self.save()
        run_local(cfg, self.cfg_path, self.run_dir, stages, self.kind)
        self.follow()  # ran in place: finished, or failed (and resubmitted until the retries are spent)

    # ---------------------------------------------------------------------------------------------- trigger
    def grow(self) -> None:
        root = self.cfg.data.root
        entries = _stage_entries(root)
        last = max((e["stage"] for e in entries), default=0)
        registering = [int(t) for t, s in self.state["stages"].items() if s["status"] == "registering"]
        if registering:  # a poll stopped while making this stage: finish it (its ingest is idempotent)
            t = registering[0]
            return self._make_stage(t, self.state["stages"][str(t)]["crawls"])
        if last >= 1 and not self._evaluated(last):  # the corpus is ahead of the run: catch up first
            self.state["stages"].setdefault(str(last), {"crawls": [], "catch_up": True})
            self.state["stages"][str(last)].update(status="launching", attempts=1)
            self.events("stage_catch_up", stage=last)
            return self.launch(last)
        ids, new = pending_pairs(self.state)
        reading = trigger(sum(int(e["count"]) for e in entries), new, self.ac)
        summary = {"base": reading.base, "new": reading.new, "ratio": reading.ratio, "min_growth": self.ac.min_growth,
                   "fire": reading.fire, "why": reading.why}  # fmt: skip
        if not reading.fire:
            if summary != self.state.get("trigger"):
                self.events("trigger_not_reached", **summary)
            self.state["trigger"] = summary
            return
        self.state["trigger"] = summary
        if self.ac.max_stages and last + 1 > self.ac.max_stages:
            if not self.state.get("max_stages_noted"):
                self.events("max_stages_reached", max_stages=self.ac.max_stages, waiting_pairs=new)
                self.state["max_stages_noted"] = True
            return
        t = last + 1
        self.state["stages"][str(t)] = {"crawls": ids, "status": "registering", "attempts": 0, "trigger": summary}
        self.events("trigger_reached", stage=t, crawls=ids, **summary)
        self.save()
        self._make_stage(t, ids)

    def _make_stage(self, t: int, ids: list[str]) -> None:
        """The staged shards of crawls ``ids`` -> DATA_ROOT stage ``t`` (``ingest --no-reencode``), then launch it."""
        root = self.cfg.data.root
        batch = self.ad.batch(t)
        batch.mkdir(parents=True, exist_ok=True)
        for i, cid in enumerate(ids):  # links named in crawl order: the stage's order is the crawls' order
            staging = self.ad.staging(cid)
            for shard in _stage_entries(staging)[0]["shards"]:
                link = batch / f"{i:04d}_{cid}_{Path(shard['name']).name}"
                if not link.is_symlink():
                    link.symlink_to((staging / shard["name"]).resolve())
        rc, msg = _data_tools("ingest", "--input", str(batch), "--format", "img2dataset", "--data-root", str(root),
                              "--stage", str(t), "--no-reencode", *_image_args(self.ac.ingest_args))  # fmt: skip
        st = self.state["stages"][str(t)]
        if rc == 1:  # every pair was already in the corpus: no stage
            for cid in ids:
                self.state["crawls"][cid]["stage"] = 0
            del self.state["stages"][str(t)]
            self.events("stage_empty", stage=t, crawls=ids, error=msg)
            self.save()
            return
        if rc != 0:
            self.state["paused"] = f"making stage {t} from the crawls failed: {msg}"
            self.events("paused", reason=self.state["paused"])
            self.save()
            return
        entry = next(e for e in _stage_entries(root) if e["stage"] == t)
        for cid in ids:
            self.state["crawls"][cid]["stage"] = t
        st.update(status="launching", attempts=1, pairs=entry["count"])
        self.state["trigger"] = None  # read again at the next poll, on the grown corpus
        self.events("stage_ingested", stage=t, crawls=ids, pairs=entry["count"], drops=entry.get("drops", {}))
        if self.cfg.data.tokenizer == "corpus" and not (root / "tokenizer.json").exists():
            vocab = str(self.cfg.model.text.vocab_size)
            rc, msg = _data_tools("train-tokenizer", str(root), "--vocab-size", vocab, "--stage", str(t))
            self.events("tokenizer_trained" if rc == 0 else "tokenizer_failed", stage=t, error=msg if rc else None)
        self.save()
        self.launch(t)


# ---------------------------------------------------------------------------------------------- SLURM job
class PollStopped(BaseException):
    """SIGTERM during a poll (scancel, preemption): the poll ends at once, releasing RUN_DIR/lock."""


def _poll_locked(cfg: RunCfg, cfg_path: Path, run_dir: Path, executor: str) -> None:
    """One poll under RUN_DIR/lock; SIGTERM raises :class:`PollStopped` (the lock is released on the way out)."""

    def stop(signum: int, frame: Any) -> None:
        raise PollStopped(f"autopilot poll stopped by signal {signum}")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        with run_lock(run_dir, what="jobs autopilot"):
            Autopilot(cfg, cfg_path, run_dir, executor).poll()
    finally:
        signal.signal(signal.SIGTERM, old)


def _poll_jobs(run_dir: Path) -> list[str]:
    """The run's autopilot poll jobs still queued or running."""
    from jobs.cluster import get_cluster

    return [r.job_id for r in get_cluster("slurm").active(run_dir).get((0, "autopilot"), [])]


def schedule_poll(cfg: RunCfg, cfg_path: Path, run_dir: Path, delay_s: float) -> str | None:
    """Submit the next poll job ``--begin=now+delay_s`` unless one is queued (or the autopilot was stopped)."""
    from jobs.cluster import Slurm, make_executor, record_jobs

    mine = os.environ.get("SLURM_JOB_ID")
    if [j for j in _poll_jobs(run_dir) if j != mine] or load_state(RunDir(run_dir).autopilot).get("stopped"):
        return None
    ex = make_executor(cfg.cluster, RunDir(run_dir).submitit, "slurm", "autopilot", run=cfg.name)
    extra = Slurm().parameters(cfg.cluster, [])["slurm_additional_parameters"]
    params: dict[str, Any] = {"timeout_min": cfg.autopilot.time_min}
    if delay_s > 0:
        params["slurm_additional_parameters"] = {**extra, "begin": f"now+{max(1, round(delay_s))}"}
    ex.update_parameters(**params)
    job = ex.submit(AutopilotJob(str(cfg_path), str(run_dir)))
    record_jobs(run_dir, [{"stage": 0, "step": "autopilot", "job_id": job.job_id, "executor": "slurm",
                           "time": time.time()}])  # fmt: skip
    return job.job_id


class AutopilotJob(submitit.helpers.Checkpointable):
    """One poll as a SLURM job, which then schedules the next; requeued as is (a poll is idempotent)."""

    def __init__(self, config: str, run_dir: str) -> None:
        self.config, self.run_dir = config, run_dir

    def __call__(self) -> str:
        from jobs.logs import setup_logging

        setup_logging()
        cfg, cfg_path, run_dir = load_cfg(Path(self.config)), Path(self.config), Path(self.run_dir)
        try:
            _poll_locked(cfg, cfg_path, run_dir, "slurm")
        except LockError as exc:
            logger.warning("autopilot poll skipped: %s", exc)
            Events(RunDir(run_dir).autopilot)("poll_skipped", reason=str(exc))
        except PollStopped as exc:  # cancelled: schedule nothing (a preempted job is requeued by SLURM itself)
            Events(RunDir(run_dir).autopilot)("poll_stopped", reason=str(exc))
            raise
        finally:  # also after a failed poll: the next one retries (the event log and the job's log say why)
            if sys.exc_info()[0] is not PollStopped:
                nxt = schedule_poll(cfg, cfg_path, run_dir, cfg.autopilot.poll_s)
                logger.info("next autopilot poll: %s", f"job {nxt}" if nxt else "already queued or stopped")
        return "polled"


# ----------------------------------------------------------------------------------------------------- CLI
def _prepare(args: argparse.Namespace) -> tuple[RunCfg, Path, Path, str]:
    cfg = with_absolute_paths(load_cfg(args.config, args.overrides))
    if cfg.autopilot.inbox == Path(""):
        raise ConfigError(
            "autopilot.inbox is not set; set it in the config or --set autopilot.inbox=DIR (where crawls land)"
        )
    if not cfg.autopilot.inbox.is_dir():
        raise ConfigError(f"autopilot.inbox {cfg.autopilot.inbox} is not a directory; create it or fix the path")
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    kind = args.executor or cfg.cluster.executor
    cfg = replace(cfg, cluster=replace(cfg.cluster, executor=kind))
    stored = check_run_dir(run_dir, cfg)
    if stored is not None:  # keep the run's plan length (the autopilot raised it); the rest is this config
        cfg = replace(cfg, data=replace(cfg.data, stages=load_cfg(stored).data.stages))
    return cfg, run_dir, RunDir(run_dir).config_yaml, kind


def cmd_autopilot(args: argparse.Namespace) -> int:
    from jobs.logs import setup_logging

    setup_logging()
    try:
        cfg, run_dir, cfg_path, kind = _prepare(args)
        ad = RunDir(run_dir).autopilot
        with run_lock(run_dir, break_lock=args.break_lock, what="jobs autopilot"):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, dump_cfg(cfg))
            state, events = load_state(ad), Events(ad)
            if args.resume and state.get("paused"):
                events("resumed", was=state["paused"])
                state["paused"] = None
                t = state.get("in_flight")
                if t is not None:
                    state["stages"][str(t)]["attempts"] = 0
            if args.stop:
                state["stopped"] = True
                events("stopped", jobs=_poll_jobs(run_dir) if kind == "slurm" else [])
            else:
                state.pop("stopped", None)
            save_state(ad, state)
        if args.stop:
            from jobs.cluster import get_cluster

            cancelled = get_cluster("slurm").cancel(_poll_jobs(run_dir))
            print(f"autopilot stopped{' (cancelled ' + ' '.join(cancelled) + ')' if cancelled else ''}")
            return 0
        if kind == "slurm":
            queued = _poll_jobs(run_dir)
            if queued:
                print(f"the autopilot of {run_dir} is already scheduled (job {' '.join(queued)}); nothing to do")
                return 0
            job = schedule_poll(cfg, cfg_path, run_dir, 0)
            print(f"autopilot: poll job {job} submitted; it re-submits itself every {cfg.autopilot.poll_s:g} s")
            return 0
        # in the foreground until SIGINT or SIGTERM (a background job started by a script ignores SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with run_lock(run_dir, break_lock=args.break_lock, what="jobs autopilot"):
            while True:
                Autopilot(cfg, cfg_path, run_dir, kind).poll()
                if args.once:
                    return 0
                time.sleep(cfg.autopilot.poll_s)
    except (ConfigError, LockError, ValueError) as exc:
        return fail(exc, 2)
    except KeyboardInterrupt:
        print("autopilot stopped (interrupted); run the same command to go on")
        return 0
