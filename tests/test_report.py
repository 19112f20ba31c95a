"""Offline run reports (issue #7): tables, plots and comparisons read from the run dirs of a tiny real run.

One 3-stage run of the tiny growth plan (debug executor) is built once; damaged copies of it stand in
for a running run (last events line cut mid-JSON, no final.pt, no evaluation), a run with a stage
deleted, and a run whose search failed. Every number in the report is checked against the files the
jobs wrote, read directly here (JSON, JSONL, HDF5).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import pytest
from PIL import Image

from jobs.engine.report import ReportError, compare_runs, interpolate_at, load_run, tower_params, write_report
from jobs.engine.runs import find_runs, format_runs, run_line
from model.spec import ArchSpec

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jobs_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GROWCLIP_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The readable records of an events.jsonl (a cut-off last line is skipped, as the report does)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def losses(path: Path) -> list[float]:
    return [e["loss"] for e in jsonl(path) if e["event"] == "train"]


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tiny_pipeline_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RUN_ROOT with: full (3 stages done), running (stage 3 mid-training, last line torn), gap (stage 2
    deleted), noeval (stage 2 not evaluated), failed (stage 3 search: a candidate failed, nothing after)."""
    root = tmp_path_factory.mktemp("report") / "runs"
    full = root / "full"
    proc = jobs_cli("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(full))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = {"full": full}
    for name in ("running", "gap", "noeval", "failed"):
        out[name] = root / name
        shutil.copytree(full, out[name], ignore=shutil.ignore_patterns("*.pt", "*.sha256"))
    # running: stage 3 still training — no final.pt/eval, and its last events line cut mid-JSON
    s3 = out["running"] / "stage_03"
    shutil.rmtree(s3 / "eval")
    events = s3 / "train" / "events.jsonl"
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    for d in ("gap", "noeval"):  # stand-ins for the finished-training markers the copies left out
        for t in (1, 2, 3):
            (out[d] / f"stage_{t:02d}" / "train" / "final.pt").write_bytes(b"")
    shutil.rmtree(out["gap"] / "stage_02")
    (out["noeval"] / "stage_02" / "eval" / "metrics.json").unlink()
    # failed: stage 3 searched, candidate 1 failed, no selection/training/evaluation
    s3 = out["failed"] / "stage_03"
    for p in ("train", "eval", "selected.json"):
        shutil.rmtree(s3 / p) if (s3 / p).is_dir() else (s3 / p).unlink()
    (s3 / "search" / "cand_01" / "result.json").unlink()
    t0 = jsonl(s3 / "search" / "cand_01" / "events.jsonl")[0]["time"]
    (s3 / "search" / "cand_01" / "failed.json").write_text(
        json.dumps({"stage": 3, "index": 1, "name": "image_depth", "error": "RuntimeError: boom", "time": t0 + 1.5})
    )
    return out


def md_table(text: str, first_header: str, nth: int = 0) -> list[dict[str, str]]:
    """The nth markdown table whose first header cell is ``first_header``, as dicts (escaped pipes kept)."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    found = [t for t in tables if cells(t[0])[0] == first_header]
    head = cells(found[nth][0])
    return [dict(zip(head, cells(row), strict=True)) for row in found[nth][2:]]


# ---------------------------------------------------------------------------------------- numbers
def test_stage_numbers_equal_the_logs(runs: dict[str, Path]) -> None:
    run_dir = runs["full"]
    rep = load_run(run_dir)
    assert rep["name"] == "tinygrow" and rep["stages_planned"] == 3 and rep["stages_done"] == 3
    assert rep["warnings"] == []
    cum_flops, prev_loss = 0, None
    for t, row in enumerate(rep["stages"], 1):
        sd = run_dir / f"stage_{t:02d}"
        spec = ArchSpec.from_dict(read(sd / "train" / "spec.json"))
        events = jsonl(sd / "train" / "events.jsonl")
        end = next(e for e in events if e["event"] == "end")
        with h5py.File(sd / "train" / "metrics.h5") as f:
            h5_loss, h5_samples = f["loss"][:], f["samples"][:]
        assert row["params"] == spec.params() and row["flops_per_sample"] == spec.flops_per_sample()
        assert row["params_image"] + row["params_text"] + row["params_shared"] + 1 == spec.params()
        assert row["samples_seen"] == end["samples"] == int(h5_samples[-1])
        assert row["train_steps"] == end["step"]
        assert row["final_train_loss"] == losses(sd / "train" / "events.jsonl")[-1] == h5_loss[-1]
        assert row["first_train_loss"] == h5_loss[0]
        assert row["train_flops"] == spec.flops_per_sample() * end["samples"]
        results = [read(p) for p in sorted((sd / "search").glob("cand_*/result.json"))]
        assert row["search_flops"] == sum(r["train_flops"] for r in results)
        cum_flops += row["search_flops"] + row["train_flops"]
        assert row["cum_flops"] == cum_flops
        start = next(e for e in events if e["event"] == "start")
        assert row["train_wall_s"] == pytest.approx(end["time"] - start["time"])
        assert row["compute_hours"] == pytest.approx(
            (row["train_wall_s"] + sum(r["seconds"] for r in results)) / 3600  # gpus_per_node 0, 1 core per task
        )
        ev = read(sd / "eval" / "metrics.json")
        for task, r in ev["tasks"].items():
            if r["type"] == "classification":
                assert row["acc1"][task] == r["acc1"]
            else:
                assert row["retrieval"][task]["image_to_text_R@5"] == r["image_to_text_R@5"]
                assert row["i2t_R@1"] == r["image_to_text_R@1"] and row["t2i_R@1"] == r["text_to_image_R@1"]
        assert row["mean_acc1"] == ev["summary"]["mean_acc1"]
        assert rep["kernels"][str(t)] == start["kernels"]
        if t == 1:
            assert row["chosen"] == "initial" and row["val_loss"] is None
            prev_loss = row["final_train_loss"]
            continue
        sel = read(sd / "selected.json")
        win = read(sd / "search" / f"cand_{sel['winner']['index']:02d}" / "result.json")
        assert row["chosen"] == sel["winner"]["name"] and row["val_loss"] == win["val_loss"]
        growth = next(g for g in rep["growth"] if g["stage"] == t)
        assert growth["params_before"] == sel["growth"]["params_before"]
        assert growth["params_after"] == sel["growth"]["params_after"] == row["params"]
        assert growth["preservation_error"] == sel["growth"]["error"]
        assert growth["loss_before"] == prev_loss
        assert growth["loss_after"] == losses(sd / "train" / "events.jsonl")[0]
        work = sd / "search" / f"cand_{sel['winner']['index']:02d}" / "work" / f"stage_{t:02d}" / "train"
        assert growth["loss_after_search"] == losses(work / "events.jsonl")[0]
        prev_loss = row["final_train_loss"]
    for cand in rep["search"]:
        res = read(run_dir / f"stage_{cand['stage']:02d}" / "search" / f"cand_{cand['index']:02d}" / "result.json")
        sel = read(run_dir / f"stage_{cand['stage']:02d}" / "selected.json")
        assert (cand["score"], cand["val_loss"], cand["cost"], cand["params"]) == (
            res["score"],
            res["val_loss"],
            res["cost"],
            res["params"],
        )
        assert cand["winner"] == (cand["index"] == sel["winner"]["index"])
        assert cand["rank"] == next(r["rank"] for r in sel["table"] if r["index"] == cand["index"])


def test_markdown_csv_and_json_show_the_logged_numbers(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["full"]
    write_report([run_dir], tmp_path / "md", "md")
    text = (tmp_path / "md" / "report.md").read_text()
    arch = md_table(text, "stage", 0)
    evals = md_table(text, "stage", 1)
    for t in (1, 2, 3):
        sd = run_dir / f"stage_{t:02d}"
        ev = read(sd / "eval" / "metrics.json")
        row, erow = arch[t - 1], evals[t - 1]
        assert row["status"] == "evaluated"
        assert row["samples seen"] == str(
            next(e for e in jsonl(sd / "train" / "events.jsonl") if e["event"] == "end")["samples"]
        )
        assert erow["mean acc1"] == f"{ev['summary']['mean_acc1']:.3f}"
        assert erow["acc1 mnist"] == f"{ev['tasks']['mnist']['acc1']:.3f}"
        assert erow["emoji_retrieval t2i R@10"] == f"{ev['tasks']['emoji_retrieval']['text_to_image_R@10']:.3f}"
        assert erow["final train loss"] == f"{losses(sd / 'train' / 'events.jsonl')[-1]:.4f}"
    search2 = md_table(text, "cand", 0)
    for row in search2:
        res = read(run_dir / "stage_02" / "search" / f"cand_{int(row['cand']):02d}" / "result.json")
        assert row["score"] == f"{res['score']:.4f}" and row["val_loss"] == f"{res['val_loss']:.4f}"
    winner = read(run_dir / "stage_02" / "selected.json")["winner"]
    assert [r["name"] for r in search2 if r["winner"]] == [winner["name"]]
    growth = md_table(text, "stage", 2)  # the growth-events table
    assert growth[0]["candidate"] == winner["name"]
    assert growth[0]["loss after (first of t)"] == f"{losses(run_dir / 'stage_02' / 'train' / 'events.jsonl')[0]:.4f}"
    kernels = next(e for e in jsonl(run_dir / "stage_01" / "train" / "events.jsonl") if e["event"] == "start")[
        "kernels"
    ]
    assert f"| adamw | {kernels['adamw']} |" in text  # kernels: the same on every stage
    assert "est. CPU core-hours" in text and "gpus_per_node is 0" in text

    write_report([run_dir], tmp_path / "csv", "csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "stages.csv").read_text())))
    rep = load_run(run_dir)
    for row, s in zip(rows, rep["stages"], strict=True):
        assert float(row["final_train_loss"]) == s["final_train_loss"] and int(row["cum_flops"]) == s["cum_flops"]
        assert float(row["acc1/digits"]) == s["acc1"]["digits"]
    assert {p.name for p in (tmp_path / "csv").iterdir()} == {"stages.csv", "search.csv", "growth.csv", "kernels.csv"}

    write_report([run_dir], tmp_path / "json", "json")
    doc = read(tmp_path / "json" / "report.json")
    assert doc["runs"][0]["stages"] == json.loads(json.dumps(rep["stages"]))


# ------------------------------------------------------------------------------------------- plots
def assert_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_plots_are_valid_pngs_and_html_embeds_them(runs: dict[str, Path], tmp_path: Path) -> None:
    written = write_report([runs["full"], runs["running"]], tmp_path, "html")
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == sorted(
        ["zeroshot_vs_compute.png"]
        + [f"{n}_{k}.png" for n in ("tinygrow_full", "tinygrow_running") for k in ("loss", "arch", "search")]
    )
    for p in (tmp_path / "plots").iterdir():
        assert_png(p.read_bytes())
    page = (tmp_path / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 7 and tmp_path / "report.html" in written
    for b64 in embedded:
        assert_png(base64.b64decode(b64))
    assert "<table>" in page and "At equal compute" in page


# ---------------------------------------------------------------------------------- damaged runs
def test_running_run_with_a_torn_last_line(runs: dict[str, Path]) -> None:
    rep = load_run(runs["running"])
    assert any("stage_03/train/events.jsonl" in w and "cut off" in w for w in rep["warnings"])
    s3 = rep["stages"][2]
    assert s3["status"].startswith("training (step")  # the 'end' record was the torn line
    train_losses = losses(runs["running"] / "stage_03" / "train" / "events.jsonl")
    assert s3["final_train_loss"] == train_losses[-1] and s3["mean_acc1"] is None
    assert rep["stages_done"] == 2
    line = run_line(runs["running"], queued=None)
    assert line.state == "incomplete" and "stage 3: training stopped at step" in line.detail


def test_missing_stage_and_missing_eval_are_reported_not_fatal(runs: dict[str, Path]) -> None:
    gap = load_run(runs["gap"])
    assert [s["status"] for s in gap["stages"]] == ["evaluated", "missing", "evaluated"]
    assert any("stage_02/ is missing" in w for w in gap["warnings"])
    g3 = next(g for g in gap["growth"] if g["stage"] == 3)
    assert g3["loss_before"] is None  # stage 2's last loss is gone with its directory
    assert gap["stages"][2]["cum_flops"] == gap["stages"][0]["cum_flops"] + gap["stages"][2]["stage_flops"]

    noeval = load_run(runs["noeval"])
    assert noeval["stages"][1]["status"] == "trained (not evaluated)" and noeval["stages"][1]["mean_acc1"] is None
    assert any("stage_02/eval/metrics.json is missing" in w for w in noeval["warnings"])


def test_failed_candidate_in_search_table_and_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    rep = load_run(runs["failed"])
    s3 = [c for c in rep["search"] if c["stage"] == 3]
    failed = next(c for c in s3 if c["index"] == 1)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and failed["score"] is None
    assert failed["seconds"] == pytest.approx(1.5)  # first event to failed.json: counted in the compute estimate
    assert rep["stages"][2]["status"].startswith("searching (2/3")
    write_report([runs["failed"]], tmp_path, "md")
    text = (tmp_path / "report.md").read_text()
    assert "Stage 3: 3 candidates, 2 scored, 1 without a result" in text and "RuntimeError: boom" in text
    assert_png((tmp_path / "plots" / "tinygrow_search.png").read_bytes())
    line = run_line(runs["failed"])
    assert line.state == "failed" and "cand_01 failed: RuntimeError: boom" in line.detail


# ------------------------------------------------------------------------------------- comparison
def test_interpolate_at() -> None:
    pts = [(10.0, 0.2), (30.0, 0.6)]
    assert interpolate_at(pts, 20.0) == pytest.approx(0.4)
    assert interpolate_at(pts, 10.0) == 0.2 and interpolate_at(pts, 30.0) == 0.6
    assert interpolate_at(pts, 5.0) is None and interpolate_at(pts, 31.0) is None
    assert interpolate_at([], 1.0) is None


def test_compare_runs_at_equal_compute(runs: dict[str, Path]) -> None:
    full, running = load_run(runs["full"]), load_run(runs["running"])
    cmp = compare_runs([runs["full"], runs["running"]])
    assert [r["run"] for r in cmp["runs"]] == ["tinygrow (full)", "tinygrow (running)"]
    eq = cmp["equal_compute"]
    # running reached stage 2 evaluated only: equal compute = its stage-2 cumulative FLOPs
    c = running["stages"][1]["cum_flops"]
    assert eq["flops"] == c and "linearly interpolated" in eq["method"]
    by_run = {r["run"]: r for r in eq["rows"]}
    assert by_run["tinygrow (running)"]["mean_acc1"] == running["stages"][1]["mean_acc1"]
    # full's curve passes through the same stage-2 point (same logs up to stage 2)
    assert by_run["tinygrow (full)"]["mean_acc1"] == pytest.approx(full["stages"][1]["mean_acc1"])
    mid = (full["stages"][1]["cum_flops"] + full["stages"][2]["cum_flops"]) / 2
    expect = (full["stages"][1]["mean_acc1"] + full["stages"][2]["mean_acc1"]) / 2
    points = [(s["cum_flops"], s["mean_acc1"]) for s in full["stages"]]
    assert interpolate_at(points, mid) == pytest.approx(expect)
    final = {r["run"]: r for r in cmp["runs"]}
    assert (
        final["tinygrow (full)"]["mean_acc1"]
        == read(runs["full"] / "stage_03" / "eval" / "metrics.json")["summary"]["mean_acc1"]
    )
    assert final["tinygrow (running)"]["evaluated_stage"] == 2


# -------------------------------------------------------------------------------------- CLI + runs
def test_cli_report_and_runs(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    out = tmp_path / "cmp"
    proc = jobs_cli("report", str(runs["full"]), str(runs["gap"]), "--out", str(out))  # the real command line
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"open {out / 'report.md'}" in proc.stdout
    text = (out / "report.md").read_text()
    assert "## Comparison" in text and "### At equal compute" in text and "## Run tinygrow (gap)" in text
    assert "stage_02/ is missing" in text

    # the other cases in-process (same parser and handlers, without a second torch import per call)
    capsys.readouterr()
    assert main(["report", str(runs["full"])]) == 0  # no --out: the text summary of one run
    stdout = capsys.readouterr().out
    assert "stage 2: chosen=" in stdout and "mean_acc1" in stdout

    root = runs["full"].parent
    assert main(["report", str(root), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is a RUN_ROOT holding runs" in err and "jobs runs" in err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a run dir" in capsys.readouterr().err
    assert main(["report", str(runs["full"]), str(runs["gap"])]) == 2
    assert "need --out DIR" in capsys.readouterr().err

    assert main(["runs", str(root)]) == 0
    stdout = capsys.readouterr().out
    states = {re.search(r"\((\w+)\)", ln).group(1): ln.split()[3] for ln in stdout.splitlines()[1:]}
    assert states == {
        "full": "finished",
        "running": "incomplete",
        "gap": "incomplete",
        "noeval": "incomplete",
        "failed": "failed",
    }
    assert "3/3" in next(ln for ln in stdout.splitlines() if "(full)" in ln)
    assert "stage 2: missing (later stages exist)" in next(ln for ln in stdout.splitlines() if "(gap)" in ln)


def test_runs_states_from_lock_and_queue(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "live"
    shutil.copytree(runs["running"], run)
    (run / "lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": 0}))
    assert run_line(run).state == "running"
    (run / "lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "time": 0}))
    stale = run_line(run)
    assert stale.state == "incomplete" and "stale lock" in stale.detail
    (run / "lock").unlink()
    jobs = {"jobs": [{"stage": 3, "step": "train", "job_id": "77", "executor": "slurm", "time": 0}]}
    (run / "jobs.json").write_text(json.dumps(jobs))
    assert run_line(run, queued={"77": "PENDING"}).state == "queued"
    assert run_line(run, queued={"77": "RUNNING"}).state == "running"
    timed_out = run_line(run, queued={}, ended={"77": "TIMEOUT"})
    assert timed_out.state == "failed" and "slurm job 77 TIMEOUT" in timed_out.detail
    assert "squeue not reachable" in run_line(run, queued=None).detail
    assert find_runs(run) == [run]
    table = format_runs([run_line(run)], now=0)
    assert table.splitlines()[0].split() == ["NAME", "STAGES", "STATE", "LAST", "UPDATE", "DETAIL"]


def test_not_a_run_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ReportError, match="is not a run dir"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        find_runs(tmp_path / "nope")


def test_tower_params_sum_to_spec_params() -> None:
    from model.spec import TINY

    for spec in (TINY, TINY.with_changes(shared={"depth": 2}), TINY.with_changes(image={"width": 64, "heads": 4})):
        towers = tower_params(spec)
        assert sum(towers.values()) == spec.params() and towers["other"] == 1


def test_blocks_render_to_markdown_and_html() -> None:
    from jobs.engine.report import BulletList, Heading, Image, Paragraph, Table, render_html, render_markdown

    blocks = [
        Heading(2, "Run a<b"),
        Paragraph("x & y"),
        BulletList(["w1", "w2"]),
        Table(["k", "v|w"], [["a", "1"]]),
        Image("plots/a.png", "loss"),
    ]
    assert render_markdown(blocks) == (
        "## Run a<b\n\nx & y\n\n- w1\n- w2\n\n| k | v\\|w |\n|---|---|\n| a | 1 |\n\n![loss](plots/a.png)\n"
    )
    page = render_html(blocks, {"plots/a.png": b"PNG"})
    body = page.split("<body>\n", 1)[1].split("\n</body>", 1)[0].splitlines()
    assert body == [
        "<h2>Run a&lt;b</h2>",
        "<p>x &amp; y</p>",
        "<ul><li>w1</li><li>w2</li></ul>",
        "<table><thead><tr><th>k</th><th>v|w</th></tr></thead><tbody><tr><td>a</td><td>1</td></tr></tbody></table>",
        f'<figure><img src="data:image/png;base64,{base64.b64encode(b"PNG").decode()}" alt="loss">'
        "<figcaption>loss</figcaption></figure>",
    ]
    assert 'src="plots/a.png"' in render_html(blocks)  # without the bytes: linked, not embedded
