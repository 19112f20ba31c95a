"""Growth on autopilot (issue #20): the trigger, completeness, once-by-content, state, and the loop end to end with the
in-process executor (the recurring SLURM job: tests/test_autopilot_slurm.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.autopilot_poll import INPUT_ARGS, Autopilot, _without
from jobs.cli import main as jobs_main
from jobs.config import AutopilotCfg, ConfigError, load_cfg
from jobs.engine.autopilot import (
    Events,
    crawl_content_id,
    is_complete,
    load_state,
    save_state,
    status_lines,
    trigger,
)
from jobs.engine.rundir import RunDir
from tests.helpers import autopilot_setup, drop_crawl


def events_of(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in Events(RunDir(run_dir).autopilot).read() if e["event"] == kind]


def test_trigger() -> None:
    cfg = AutopilotCfg(min_growth=1.5, min_pairs=10)
    assert not trigger(0, 0, cfg).fire and not trigger(0, 9, cfg).fire
    first = trigger(0, 10, cfg)
    assert first.fire and first.ratio is None and "empty corpus" in first.why
    below = trigger(100, 40, cfg)
    assert not below.fire and below.ratio == pytest.approx(1.4) and "1.400 < autopilot.min_growth=1.5" in below.why
    assert trigger(100, 50, cfg).fire
    assert not trigger(1000, 9, AutopilotCfg(min_growth=1.0, min_pairs=10)).fire


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="autopilot sets those itself"):
        load_cfg(None, ["autopilot.ingest_args=[--stage, '3']"])
    with pytest.raises(ConfigError, match=r"min_growth=0\.5 must be >= 1"):
        load_cfg(None, ["autopilot.min_growth=0.5"])
    args = ("--image-size", "16", "--caption-col", "title", "--separator=,", "--no-foo")
    assert _without(args, INPUT_ARGS) == ["--image-size", "16", "--no-foo"]
    with pytest.raises(ConfigError, match="autopilot sets those itself"):
        load_cfg(None, ["autopilot.ingest_args=[--stage=3]"])


def test_completeness_and_identity(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    crawl = drop_crawl(inbox, "a", 3, seed=1, marker=False)
    cfg = AutopilotCfg(inbox=inbox)
    entry: dict = {}
    assert is_complete(crawl, cfg, entry, now=100.0) is None  # no marker, quiet_s = 0: marker only
    quiet = AutopilotCfg(inbox=inbox, quiet_s=60)
    assert is_complete(crawl, quiet, entry, now=100.0) is None  # first look: the clock starts
    assert is_complete(crawl, quiet, entry, now=159.0) is None
    assert is_complete(crawl, quiet, entry, now=161.0) == "quiet"
    (crawl / "00001.tar").write_bytes(b"more")  # it changed: the clock starts over
    assert is_complete(crawl, quiet, entry, now=162.0) is None
    (crawl / "00001.tar").unlink()
    (crawl / "_SUCCESS").touch()
    assert is_complete(crawl, cfg, {}, now=0.0) == "marker"
    copy = shutil.copytree(crawl, inbox / "b")
    assert crawl_content_id(copy, "_SUCCESS") == crawl_content_id(crawl, "_SUCCESS")
    (copy / "_SUCCESS").write_text("a marker's content is not the crawl's")
    assert crawl_content_id(copy, "_SUCCESS") == crawl_content_id(crawl, "_SUCCESS")
    (copy / "00000_stats.json").write_text("{}")
    assert crawl_content_id(copy, "_SUCCESS") != crawl_content_id(crawl, "_SUCCESS")


def test_state_of_another_version_is_refused(tmp_path: Path) -> None:
    ad = RunDir(tmp_path).autopilot
    ad.path.mkdir()
    ad.state_json.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="move it away"):
        load_state(ad)


def test_autopilot_without_inbox_is_one_error_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "autopilot.inbox is not set" in err[0]


@pytest.fixture
def setup(tmp_path: Path, tiny_corpus: Path) -> tuple[Path, Path, Path]:
    """(config, inbox, run dir) of a debug-executor autopilot on an empty corpus."""
    cfg = autopilot_setup(tmp_path, tiny_corpus / "eval", "debug")
    return cfg, tmp_path / "inbox", tmp_path / "runs" / "autopilot"


def poll(cfg: Path, run_dir: Path) -> None:
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once"]) == 0


def test_crawls_grow_the_model_across_stages(setup: tuple[Path, Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, inbox, run_dir = setup
    drop_crawl(inbox, "crawl_1", 60, seed=1)
    drop_crawl(inbox, "incomplete", 30, seed=9, marker=False)  # no marker: never taken
    poll(cfg, run_dir)  # stage 1 from crawl_1 (the tokenizer trained on it), trained, evaluated
    assert (run_dir / "stage_01" / "eval" / "metrics.json").exists()
    drop_crawl(inbox, "crawl_2", 20, seed=2)  # 80 / 60 = 1.33 < 1.5: waits
    shutil.copytree(inbox / "crawl_1", inbox / "crawl_1_again")  # the same content again
    bad = inbox / "bad_table"
    bad.mkdir()
    (bad / "pairs.csv").write_text("text,path\nhello,a.jpg\n")  # no caption/image column: rejected
    (bad / "_SUCCESS").touch()
    poll(cfg, run_dir)
    assert not (run_dir / "stage_02").exists()
    (reading,) = events_of(run_dir, "trigger_not_reached")[-1:]
    assert (reading["base"], reading["new"]) == (60, 20) and reading["ratio"] == pytest.approx(80 / 60)
    drop_crawl(inbox, "crawl_3", 20, seed=3)  # 100 / 60 >= 1.5: crawls 2 and 3 become stage 2
    poll(cfg, run_dir)
    poll(cfg, run_dir)  # nothing new: nothing happens
    assert (run_dir / "stage_02" / "eval" / "metrics.json").exists()
    from data_tools.manifest import load_manifest

    stages = load_manifest(run_dir.parent.parent / "data")["stages"]
    assert [(s["stage"], s["count"]) for s in stages] == [(1, 60), (2, 40)]
    ingested = [e["crawl"] for e in events_of(run_dir, "crawl_ingested")]
    assert sorted(ingested) == ["crawl_1", "crawl_2", "crawl_3"]  # each once; the copy and the incomplete one not
    assert [e["same_as"] for e in events_of(run_dir, "crawl_duplicate")] == ["crawl_1"]
    (rejected,) = events_of(run_dir, "crawl_rejected")
    assert rejected["crawl"] == "bad_table" and "caption" in rejected["error"]
    assert [e["stage"] for e in events_of(run_dir, "stage_submitted")] == [1, 2]
    assert [e["stage"] for e in events_of(run_dir, "stage_finished")] == [1, 2]
    assert load_cfg(run_dir / "config.yaml").data.stages == 2
    capsys.readouterr()
    assert jobs_main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "autopilot: last poll" in out and "stages made by the autopilot: 1, 2" in out
    assert "1 not complete yet (incomplete)" in out
    assert jobs_main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("[made by the autopilot]") == 2


def test_failed_stage_is_retried_then_paused_until_resume(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import jobs.submit

    cfg_path, inbox, run_dir = setup
    drop_crawl(inbox, "crawl_1", 40, seed=1)
    runs: list[list[int]] = []
    monkeypatch.setattr(jobs.submit, "run_local", lambda cfg, path, rd, stages, kind: runs.append(stages) or 1)
    poll(cfg_path, run_dir)  # attempt 1 fails, resubmitted twice (autopilot.retries=2), then growth pauses
    assert runs == [[1], [1], [1]]
    state = load_state(RunDir(run_dir).autopilot)
    assert state["in_flight"] == 1 and "stage 1 failed 3 times" in state["paused"]
    assert [e["resubmit"] for e in events_of(run_dir, "stage_failed")] == [True, True, False]
    drop_crawl(inbox, "crawl_2", 40, seed=2)
    poll(cfg_path, run_dir)  # paused: crawls are still taken, nothing is submitted
    assert runs == [[1], [1], [1]] and [e["crawl"] for e in events_of(run_dir, "crawl_ingested")][-1] == "crawl_2"
    capsys.readouterr()
    jobs_main(["status", str(run_dir)])
    assert "PAUSED: stage 1 failed 3 times" in capsys.readouterr().out
    monkeypatch.undo()
    assert jobs_main(["autopilot", "--config", str(cfg_path), "--run-dir", str(run_dir), "--once", "--resume"]) == 0
    assert (run_dir / "stage_01" / "eval" / "metrics.json").exists()
    state = load_state(RunDir(run_dir).autopilot)
    assert state["paused"] is None and state["stages"]["1"]["status"] == "finished"
    assert len(events_of(run_dir, "resumed")) == 1


def test_a_poll_stopped_while_making_a_stage_is_completed_once(setup: tuple[Path, Path, Path]) -> None:
    """State says "registering" (the poll died around the stage's ingest): the next poll finishes that stage, and
    no crawl or stage is taken twice."""
    cfg_path, inbox, run_dir = setup
    drop_crawl(inbox, "crawl_1", 40, seed=1)
    cfg = load_cfg(cfg_path)
    ap = Autopilot(cfg, run_dir / "config.yaml", run_dir, "debug")
    run_dir.mkdir(parents=True)
    ap.take_crawls(deadline=float("inf"))
    ids = list(ap.state["crawls"])
    ap.state["stages"]["1"] = {"crawls": ids, "status": "registering", "attempts": 0}
    save_state(ap.ad, ap.state)
    poll(cfg_path, run_dir)
    assert (run_dir / "stage_01" / "eval" / "metrics.json").exists()
    assert [e["stage"] for e in events_of(run_dir, "stage_ingested")] == [1]
    assert len(events_of(run_dir, "crawl_ingested")) == 1
    assert any("stage 1 in flight" in line or "no stage in flight" in line for line in status_lines(ap.ad))


def test_a_failing_ingest_is_retried_then_rejected_and_taken_again_under_new_args(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_tools.cli

    cfg, inbox, run_dir = setup
    drop_crawl(inbox, "crawl_1", 10, seed=1)
    real = data_tools.cli.run_ingest

    def disk_full(args):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_tools.cli, "run_ingest", disk_full)
    wait = ["--set", "autopilot.min_pairs=1000"]  # no stage: this is about the crawl
    for _ in range(3):
        assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait]) == 0
    assert [e["failures"] for e in events_of(run_dir, "crawl_ingest_failed")] == [1, 2, 3]
    (rejected,) = events_of(run_dir, "crawl_rejected")
    assert "failed 3 times" in rejected["error"] and "No space left" in rejected["error"]
    monkeypatch.setattr(data_tools.cli, "run_ingest", real)
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait]) == 0
    assert not events_of(run_dir, "crawl_ingested")  # final under these ingest_args
    new_args = ["--set", 'autopilot.ingest_args=["--image-size", "16", "--shard-size", "25"]']
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait, *new_args]) == 0
    (ingested,) = events_of(run_dir, "crawl_ingested")
    assert ingested["crawl"] == "crawl_1" and ingested["pairs"] == 10
    drop_crawl(inbox, "crawl_2", 10, seed=2)  # the disk is full again for three polls: rejected, then --resume
    monkeypatch.setattr(data_tools.cli, "run_ingest", disk_full)
    for _ in range(3):
        assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait]) == 0
    assert [e["crawl"] for e in events_of(run_dir, "crawl_rejected")] == ["crawl_1", "crawl_2"]
    rejected_id = events_of(run_dir, "crawl_rejected")[1]["id"]
    assert not RunDir(run_dir).autopilot.staging(rejected_id).exists()  # a rejected crawl leaves nothing staged
    monkeypatch.setattr(data_tools.cli, "run_ingest", real)
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", "--resume", *wait]) == 0
    assert [e["ids"] for e in events_of(run_dir, "crawls_retried")] == [[rejected_id]]
    assert [e["crawl"] for e in events_of(run_dir, "crawl_ingested")] == ["crawl_1", "crawl_2"]


def test_start_refuses_bad_ingest_args_and_small_shards(setup: tuple[Path, Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, _, run_dir = setup
    base = ["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once"]
    typo = ["--set", 'autopilot.ingest_args=["--image_size", "16"]']
    capsys.readouterr()
    assert jobs_main([*base, *typo]) == 2
    assert "unrecognized arguments: --image_size" in capsys.readouterr().err
    for abbreviated in ('["--image-si", "16"]', '["-h"]'):  # whole option names only; no help that exits
        assert jobs_main([*base, "--set", f"autopilot.ingest_args={abbreviated}"]) == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    small = ["--set", 'autopilot.ingest_args=["--image-size", "8"]']
    assert jobs_main([*base, *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 px shards but model.image.image_size is 16" in err[0] and "--image-size 16" in err[0]


def test_a_held_lock_or_an_unreadable_crawl_loses_nothing(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held data-root lock is waited out (not a failure: no crawl is rejected for it); a crawl that cannot be
    read is reported once and leaves the others to be taken."""
    import data_tools.cli
    import jobs.autopilot_poll
    from data_tools.lock import LockError

    cfg, inbox, run_dir = setup
    drop_crawl(inbox, "crawl_1", 10, seed=1)
    drop_crawl(inbox, "crawl_2", 10, seed=2)
    real_ingest, real_id = data_tools.cli.run_ingest, jobs.autopilot_poll.crawl_content_id

    def held(args):  # type: ignore[no-untyped-def]
        raise LockError("DATA_ROOT/.lock is held by pid 7 on node-3 (ingest, since 5 s ago): wait for it to finish")

    def unreadable(crawl, marker):  # type: ignore[no-untyped-def]
        if crawl.name == "crawl_2":
            raise PermissionError(13, "Permission denied", str(crawl / "00000.tar"))
        return real_id(crawl, marker)

    monkeypatch.setattr(data_tools.cli, "run_ingest", held)
    monkeypatch.setattr(jobs.autopilot_poll, "crawl_content_id", unreadable)
    wait = ["--set", "autopilot.min_pairs=1000"]  # no stage: this is about the crawls
    for _ in range(4):  # more polls than autopilot's 3 failures
        assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait]) == 0
    assert len(events_of(run_dir, "crawl_ingest_waiting")) == 4 and not events_of(run_dir, "crawl_rejected")
    (bad,) = events_of(run_dir, "crawl_unreadable")  # once, not every poll
    assert bad["crawl"] == "crawl_2" and "Permission denied" in bad["error"]
    monkeypatch.setattr(data_tools.cli, "run_ingest", real_ingest)
    monkeypatch.setattr(jobs.autopilot_poll, "crawl_content_id", real_id)
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once", *wait]) == 0
    assert sorted(e["crawl"] for e in events_of(run_dir, "crawl_ingested")) == ["crawl_1", "crawl_2"]


def test_the_poll_chain_survives_its_predecessor_and_a_failed_sbatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A successor released by ``afterany`` while squeue still lists its predecessor (COMPLETING) schedules the
    next poll; only another *pending* poll makes scheduling unnecessary; an sbatch that fails before the poll is
    tried again after it; a poll queued before ``--stop`` does no work."""
    import jobs.autopilot as ap
    import jobs.cluster

    submitted: list[dict] = []

    class Executor:
        def update_parameters(self, **params):  # type: ignore[no-untyped-def]
            self.params = params

        def submit(self, fn):  # type: ignore[no-untyped-def]
            if fail:
                fail.pop()
                raise RuntimeError("sbatch: error: Slurm temporarily unable to accept job")
            submitted.append(self.params)
            return type("Job", (), {"job_id": str(100 + len(submitted))})()

    fail: list[int] = []
    queue: dict[str, str] = {}
    monkeypatch.setattr(jobs.cluster, "make_executor", lambda *a, **k: Executor())
    monkeypatch.setattr(ap, "poll_jobs", lambda run_dir: dict(queue))
    polled: list[str] = []
    monkeypatch.setattr(ap, "_poll", lambda cfg, path, rd, kind: polled.append(kind))
    cfg = load_cfg(None)
    run_dir = tmp_path / "run"
    (run_dir / "autopilot").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    monkeypatch.setattr(ap, "load_cfg", lambda path: cfg)
    monkeypatch.setenv("SLURM_JOB_ID", "11")
    job = ap.AutopilotJob(str(run_dir / "config.yaml"), str(run_dir))

    queue.update({"10": "COMPLETING", "11": "RUNNING"})  # the predecessor still listed, this job running
    assert job() == "polled" and len(submitted) == 1 and polled == ["slurm"]
    assert "afterany:11" in str(submitted[0]["slurm_additional_parameters"])
    queue["101"] = "PENDING"  # a pending poll exists: nothing more to schedule
    assert job() == "polled" and len(submitted) == 1
    del queue["101"]
    fail.append(1)  # sbatch fails once: the poll still runs, and the successor is submitted after it
    assert job() == "polled" and len(submitted) == 2 and len(polled) == 3
    assert [e["event"] for e in Events(RunDir(run_dir).autopilot).read()] == ["poll_schedule_failed"]
    (run_dir / "autopilot" / "stopped").write_text("1\n")
    assert job() == "stopped" and len(polled) == 3 and len(submitted) == 2


def test_a_dead_polls_staging_lock_is_removed(setup: tuple[Path, Path, Path]) -> None:
    """A poll killed on another node mid-ingest leaves its crawl's staging lock: the next poll (holding RUN_DIR/lock,
    under which alone staging is written) removes it and ingests the crawl."""
    from jobs.engine.autopilot import crawl_content_id

    cfg, inbox, run_dir = setup
    crawl = drop_crawl(inbox, "crawl_1", 10, seed=1)
    staging = RunDir(run_dir).autopilot.staging(crawl_content_id(crawl, "_SUCCESS")[:16])
    staging.mkdir(parents=True)
    (staging / ".lock").write_text(json.dumps({"pid": 1, "host": "node-9", "time": 0, "what": "ingest"}))
    assert jobs_main(["autopilot", "--config", str(cfg), "--run-dir", str(run_dir), "--once",
                      "--set", "autopilot.min_pairs=1000"]) == 0  # fmt: skip
    (removed,) = events_of(run_dir, "staging_lock_removed")
    assert "node-9" in removed["holder"]
    assert [e["crawl"] for e in events_of(run_dir, "crawl_ingested")] == ["crawl_1"]
