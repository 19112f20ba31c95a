"""One poll of ``jobs autopilot`` (issue #20): :class:`Autopilot`. The command, the recurring SLURM job and the signals
are ``jobs/autopilot.py``; the inbox, the trigger and the state files ``jobs/engine/autopilot.py``.

A poll, under RUN_DIR/lock, in order:

1. **Crawls**: every complete crawl folder of ``autopilot.inbox`` whose content is new is ingested on its own (in this
   process, ``data_tools.cli.run_ingest`` with ``autopilot.ingest_args``) into RUN_DIR/autopilot/staging/<id>/, so
   its pairs are counted (kept, dropped by reason) before they join a stage. Outcomes: ``staged``; ``empty`` (it kept
   no pair) and ``rejected`` (not an input ingest reads: the error) are final for this content and these
   ``ingest_args`` (changed args take them again); anything else (a lock, a full disk, a kill) is retried at the
   next poll, where the ingest journal resumes it, and after 3 failures recorded as ``rejected``. A poll stops
   taking crawls at half of ``autopilot.time_min``.
2. **The trigger reading**: the pairs of the crawls waiting for a stage against the corpus's (every poll, shown by
   ``jobs status``).
3. **The stage in flight** (at most one): finished once every stage up to it is evaluated; failed when it is not and
   none of its jobs is queued or running (when squeue does not answer, nothing is decided). A failed stage is
   resubmitted (only its missing work, as ``submit`` does) up to ``autopilot.retries`` times; then growth pauses
   until ``jobs autopilot --resume`` (crawls are still taken).
4. **Growth** (nothing in flight, not paused): a corpus with stages the run has not finished is caught up first;
   else, the trigger reached, the waiting crawls' staged shards become DATA_ROOT's next stage in one
   ``ingest --no-reencode`` (the pixel hashes, sizes and sources of the originals carried over: dedupe across stages
   and crawls happens there, as for a manual ingest of the crawls), the run's ``data.stages`` is raised to it, the
   corpus is checked against the model (``check_corpus``: a model larger than the shards pauses growth with the fix),
   and the stage's search -> select -> train -> evaluate chain is submitted (afterok). The staged copies are then
   removed.

Every step is recorded before and after it runs (state.json, atomic) and every ingest and submission is idempotent,
so a poll stopped anywhere is completed by the next without repeating anything; SIGTERM is held back while jobs are
submitted and recorded (:func:`jobs.autopilot.deferred_stop`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_text
from jobs.config import ConfigError, RunCfg, dump_cfg
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
from jobs.engine.rundir import RunDir

__all__ = ["Autopilot", "ingest_outcome", "INPUT_ARGS"]

logger = logging.getLogger(__name__)

# ingest options that say how to read a crawl: table crawls only; staged shards are read without them
INPUT_ARGS = ("--caption-col", "--image-col", "--separator", "--path-base")
TABLE_ONLY_ARGS = ("--separator", "--path-base")
MAX_INGEST_FAILURES = 3


def _without(args: tuple[str, ...] | list[str], names: tuple[str, ...]) -> list[str]:
    """``args`` without the options ``names`` (each ``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out


def ingest_outcome(*argv: str) -> tuple[str, Any]:
    """``python -m data_tools ingest ARGV`` in this process: ``("ok", IngestResult)``, ``("empty", why)`` (it kept no
    pair), ``("rejected", why)`` (the input, or the options, are not something ingest reads), ``("locked", why)``
    (another process holds the data root: the next poll tries again, not counted as a failure) or
    ``("retry", why)`` (an I/O error, anything else: worth another try, counted). SIGTERM's :class:`PollStopped`
    goes through."""
    from data_tools.cli import IngestArgsError, parse_ingest_args, run_ingest
    from data_tools.cli_errors import one_line
    from data_tools.ingest import IngestFailed
    from data_tools.lock import LockError

    try:
        return "ok", run_ingest(parse_ingest_args(argv))
    except IngestFailed as exc:
        return "empty", one_line(str(exc))
    except LockError as exc:  # someone holds the staging or data root: not the crawl's fault, not counted
        return "locked", one_line(str(exc))
    except (OSError, MemoryError) as exc:  # FileNotFoundError included: a crawl moved away meanwhile
        return "retry", one_line(f"{type(exc).__name__}: {exc}")
    except (IngestArgsError, ValueError, UnicodeError) as exc:
        return "rejected", one_line(str(exc))
    except Exception as exc:  # pyarrow missing, a bug: retried, then recorded as rejected
        logger.exception("ingest %s failed", " ".join(argv))
        return "retry", one_line(f"{type(exc).__name__}: {exc}")


def _stage_entries(root: Path) -> list[dict[str, Any]]:
    from data_tools.manifest import load_manifest

    return list(load_manifest(root)["stages"]) if (root / "manifest.json").exists() else []


class Autopilot:
    """The autopilot of one run: ``Autopilot(cfg, cfg_path, run_dir, executor).poll()`` (the caller holds the lock).

    ``no_stop`` is a context manager factory that holds SIGTERM back while jobs are submitted and recorded."""

    def __init__(
        self, cfg: RunCfg, cfg_path: Path, run_dir: Path, executor: str, no_stop: Any = contextlib.nullcontext
    ) -> None:
        from jobs.cluster import get_cluster

        self.cfg, self.cfg_path, self.run_dir, self.kind = cfg, cfg_path, run_dir, executor
        self.ac = cfg.autopilot
        self.ad = RunDir(run_dir).autopilot
        self.events = Events(self.ad)
        self.cluster = get_cluster(executor)
        self.no_stop = no_stop
        self.state = load_state(self.ad)
        self.args_id = hashlib.sha256(json.dumps(list(self.ac.ingest_args)).encode()).hexdigest()[:16]

    def save(self) -> None:
        save_state(self.ad, self.state)

    def poll(self) -> None:
        """One poll (see the module docstring)."""
        start = time.time()
        self.state["last_poll"] = start
        self.take_crawls(deadline=start + 30 * self.ac.time_min)
        self.read_trigger()
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
            try:
                if not self._take_if_complete(crawl, folders, deadline):
                    break
            except OSError as exc:  # unreadable, or changing under us: this crawl waits, the others go on
                error = f"{type(exc).__name__}: {exc}"
                f = folders.setdefault(crawl.name, {"seen": time.time()})
                if f.get("unreadable") != error:  # once per error, not every poll
                    self.events("crawl_unreadable", crawl=crawl.name, error=error)
                    f["unreadable"] = error

    def _take_if_complete(self, crawl: Path, folders: dict[str, Any], deadline: float) -> bool:
        """Ingest ``crawl`` if it is complete and not handled yet; False when the poll's time is up."""
        now = time.time()
        f = folders.get(crawl.name)
        if f is None:
            f = folders[crawl.name] = {"seen": now}
            self.events("crawl_seen", crawl=crawl.name)
        if f.get("done_sig") and f["done_sig"] == crawl_signature(crawl, self.ac.marker):
            known = self.state["crawls"].get(f.get("id", ""), {})
            if known.get("status") not in ("empty", "rejected") or known.get("args") == self.args_id:
                return True  # handled and unchanged since (a final outcome under other ingest_args is retried)
        why = is_complete(crawl, self.ac, f, now)
        if why is None:
            return True
        if time.time() > deadline:
            self.events("poll_time_up", crawl=crawl.name, note="left for the next poll")
            return False
        self.take_crawl(crawl, f, why)
        self.save()
        return True

    def _clear_dead_poll_lock(self, staging: Path) -> None:
        """A writer lock left in a staging root is a dead poll's, wherever it ran: only polls write there, each under
        RUN_DIR/lock, which this poll holds now. Removed (its ingest journal resumes the crawl)."""
        from data_tools.manifest import WRITER_LOCK

        lock = staging / WRITER_LOCK
        if lock.exists():
            self.events("staging_lock_removed", staging=str(staging), holder=lock.read_text(errors="replace")[:300])
            lock.unlink(missing_ok=True)

    def take_crawl(self, crawl: Path, f: dict[str, Any], why: str) -> None:
        from data_tools.inputs import resolve_format

        sig = crawl_signature(crawl, self.ac.marker)
        cid = crawl_content_id(crawl, self.ac.marker)[:16]
        known = self.state["crawls"].get(cid)
        retry_final = known is not None and known["status"] in ("empty", "rejected") and known["args"] != self.args_id
        if known is not None and not retry_final:
            f.update(done_sig=sig, id=cid)
            if known.get("folder") != crawl.name:
                self.events("crawl_duplicate", crawl=crawl.name, same_as=known.get("folder"), id=cid)
            return
        self.events("crawl_complete", crawl=crawl.name, id=cid, why=why)
        staging = self.ad.staging(cid)
        if retry_final:
            shutil.rmtree(staging, ignore_errors=True)
        self._clear_dead_poll_lock(staging)
        args = list(self.ac.ingest_args)
        with contextlib.suppress(ValueError, OSError):  # an unreadable crawl is rejected by the ingest itself
            if resolve_format(crawl, "auto") != "table":
                args = _without(args, TABLE_ONLY_ARGS)
        outcome, out = ingest_outcome("--input", str(crawl), "--format", "auto", "--data-root", str(staging),
                                      "--stage", "1", *args)  # fmt: skip
        entry: dict[str, Any] = {"folder": crawl.name, "ingested": time.time(), "stage": None, "args": self.args_id}
        if outcome == "ok":
            (stage,) = _stage_entries(staging)
            src = stage["sources"][0]
            entry.update(status="staged", pairs=stage["count"], records=src["records"], drops=stage.get("drops", {}),
                         format=src["format"])  # fmt: skip
            self.events("crawl_ingested", crawl=crawl.name, id=cid, format=src["format"], pairs=stage["count"],
                        records=src["records"], drops=stage.get("drops", {}))  # fmt: skip
        elif outcome == "locked":
            self.events("crawl_ingest_waiting", crawl=crawl.name, id=cid, error=out)
            return  # the next poll tries again; a lock left by a poll that died is taken over once it has ended
        elif outcome == "retry":
            f["failures"] = f.get("failures", 0) + 1
            self.events("crawl_ingest_failed", crawl=crawl.name, id=cid, error=out, failures=f["failures"])
            if f["failures"] < MAX_INGEST_FAILURES:
                return  # the next poll tries again (its journal resumes it)
            entry.update(status="rejected", pairs=0, error=f"failed {f['failures']} times: {out}", retries_spent=True)
            self.events("crawl_rejected", crawl=crawl.name, id=cid, pairs=0, error=entry["error"])
        else:  # "empty": it kept no pair; "rejected": not an input ingest reads
            entry.update(status=outcome, pairs=0, error=out)
            self.events("crawl_ingested" if outcome == "empty" else "crawl_rejected", crawl=crawl.name, id=cid,
                        pairs=0, error=out)  # fmt: skip
        self.state["crawls"][cid] = entry
        f.update(done_sig=sig, id=cid, failures=0)
        if entry["status"] != "staged":  # nothing in it for a stage
            shutil.rmtree(staging, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- trigger
    def read_trigger(self) -> None:
        """The trigger's reading now (``jobs status`` shows it; ``grow`` acts on it); an event when it changed."""
        entries = _stage_entries(self.cfg.data.root)
        _, new = pending_pairs(self.state)
        reading = trigger(sum(int(e["count"]) for e in entries), new, self.ac)
        summary = {"base": reading.base, "new": reading.new, "ratio": reading.ratio, "min_growth": self.ac.min_growth,
                   "fire": reading.fire, "why": reading.why}  # fmt: skip
        if not reading.fire and summary != self.state.get("trigger"):
            self.events("trigger_not_reached", **summary)
        self.state["trigger"] = summary

    # ------------------------------------------------------------------------------------------- in flight
    def _evaluated(self, t: int) -> bool:
        cfg = replace(self.cfg, data=replace(self.cfg.data, stages=t))
        return all(stage_state(cfg, self.run_dir, s).evaluated for s in range(1, t + 1))

    def follow(self) -> None:
        t = self.state["in_flight"]
        if t is None:
            return
        st = self.state["stages"][str(t)]
        if self._finished(t, st):
            return
        if self.state["paused"]:
            return
        if st["status"] == "launching":  # a poll stopped between recording the launch and making it
            self.launch(t)
            return
        if self.cluster.queues:
            from jobs.cluster import queue_reachable

            if not queue_reachable():  # an unanswered squeue is not an empty queue: decide nothing now
                self.events("queue_unreachable", stage=t)
                return
            if any(1 <= s <= t for (s, _), recs in self.cluster.active(self.run_dir).items() if recs):
                return
            if self._finished(t, st):  # its last job ended between the two looks
                return
        if st["attempts"] > self.ac.retries:
            self.events("stage_failed", stage=t, attempts=st["attempts"], resubmit=False)
            self.pause(
                f"stage {t} failed {st['attempts']} times (autopilot.retries={self.ac.retries}); see python -m jobs "
                f"status {self.run_dir}, fix the cause, then run python -m jobs autopilot ... --resume",
                stage=t,
            )
            st["status"] = "failed"
            self.save()
            return
        self.events("stage_failed", stage=t, attempts=st["attempts"], resubmit=True)
        st["attempts"] += 1
        self.launch(t)

    def _finished(self, t: int, st: dict[str, Any]) -> bool:
        """Stage ``t`` evaluated: recorded as finished (True)."""
        if not self._evaluated(t):
            return False
        st["status"] = "finished"
        self.state["in_flight"] = None
        self.events("stage_finished", stage=t, attempts=st["attempts"])
        self.save()
        return True

    def pause(self, reason: str, **fields: Any) -> None:
        self.state["paused"] = reason
        self.events("paused", reason=reason, **fields)
        self.save()

    def launch(self, t: int) -> None:
        """Submit (or, locally, run) the missing work of stages 1..t with data.stages raised to t."""
        from jobs.engine.data import check_corpus

        st = self.state["stages"][str(t)]
        st["status"] = "launching"
        self.state["in_flight"] = t
        self.save()
        cfg = replace(self.cfg, data=replace(self.cfg.data, stages=max(t, 1)))
        root = cfg.data.root
        if cfg.data.tokenizer == "corpus" and not (root / "tokenizer.json").exists():  # the first stage: train it
            from data_tools.tokenizer import train_tokenizer

            try:
                train_tokenizer(root, vocab_size=cfg.model.text.vocab_size, stage=1)
            except (ValueError, OSError) as exc:
                self.pause(f"training the corpus tokenizer on stage 1 failed: {exc}", stage=t)
                return
            self.events("tokenizer_trained", stage=1, vocab_size=cfg.model.text.vocab_size)
        try:  # what plan/submit check first: stages present, images at least the model's size, the tokenizer
            check_corpus(cfg.data.root, t, cfg.model.text.vocab_size, cfg.data.tokenizer,
                         image_size=cfg.model.image.image_size, allow_upscale=cfg.data.allow_upscale)  # fmt: skip
        except ConfigError as exc:
            self.pause(f"stage {t} cannot be submitted: {exc}", stage=t)
            return
        atomic_write_text(self.cfg_path, dump_cfg(cfg))  # the run's plan now reaches stage t
        stages = list(range(1, t + 1))
        if self.cluster.queues:
            from jobs.cluster import queue_reachable
            from jobs.submit import submit_chained

            if not queue_reachable():  # submit_chained skips queued work only when squeue answers
                self.events("queue_unreachable", stage=t)
                return  # still "launching": the next poll launches it
            with self.no_stop():  # submitted and recorded, or neither
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

    # ---------------------------------------------------------------------------------------------- growth
    def grow(self) -> None:
        entries = _stage_entries(self.cfg.data.root)
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
        summary = self.state["trigger"]
        if not summary["fire"]:
            return
        ids, new = pending_pairs(self.state)
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
            staged = _stage_entries(staging)
            if not staged:
                why = f"the staged pairs of crawl {cid} ({staging}) are gone; making stage {t} needs them"
                self.pause(f"{why}: re-ingest that crawl by hand, or move RUN_DIR/autopilot/state.json away", stage=t)
                return
            for shard in staged[0]["shards"]:
                link = batch / f"{i:04d}_{cid}_{Path(shard['name']).name}"
                if not link.is_symlink():
                    link.symlink_to((staging / shard["name"]).resolve())
        image_args = _without(self.ac.ingest_args, INPUT_ARGS)
        outcome, out = ingest_outcome("--input", str(batch), "--format", "img2dataset", "--data-root", str(root),
                                      "--stage", str(t), "--no-reencode", *image_args)  # fmt: skip
        if outcome in ("retry", "locked"):  # the next poll tries again (state "registering"; the journal resumes it)
            self.events("stage_ingest_failed", stage=t, error=out)
            return
        if outcome == "empty":  # every pair was already in the corpus: no stage
            for cid in ids:
                self.state["crawls"][cid]["stage"] = 0
            del self.state["stages"][str(t)]
            self.events("stage_empty", stage=t, crawls=ids, error=out)
            self.save()
            self._drop_staged(t, ids)
            return
        if outcome == "rejected":
            self.pause(f"making stage {t} from the crawls failed: {out}", stage=t)
            return
        entry = next(e for e in _stage_entries(root) if e["stage"] == t)
        for cid in ids:
            self.state["crawls"][cid]["stage"] = t
        self.state["stages"][str(t)].update(status="launching", attempts=1, pairs=entry["count"])
        self.state["in_flight"] = t  # saved with "launching": a poll stopped before launch() finishes it
        self.events("stage_ingested", stage=t, crawls=ids, pairs=entry["count"], drops=entry.get("drops", {}))
        self.save()
        self._drop_staged(t, ids)
        self.read_trigger()
        self.launch(t)

    def _drop_staged(self, t: int, ids: list[str]) -> None:
        """The staged copies of crawls that joined stage ``t`` (or turned out to hold nothing new)."""
        shutil.rmtree(self.ad.batch(t), ignore_errors=True)
        for cid in ids:
            shutil.rmtree(self.ad.staging(cid), ignore_errors=True)
