"""The experiment suite (issue #8): suite parsing, derived runs (model_from, match_compute), and one
end-to-end mini suite (a growth run + a fixed baseline derived from it) summarized into a results page
whose numbers equal the runs' logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_cfg
from jobs.engine.report import load_run
from jobs.engine.rundir import RunDir
from jobs.experiments import SUITE, RunSpec, load_suite, resolve_run, total_compute

REPO = Path(__file__).resolve().parents[1]


def test_shipped_suite_resolves(tmp_path: Path) -> None:
    base, exps = load_suite(REPO / SUITE)
    names = {e.name for e in exps}
    # the experiments issue #8 asks for
    assert {"growclip", "fixed_small", "fixed_final", "fixed_schedule", "pim_m0.5", "pim_m0", "shared_off"} <= names
    assert {"only_depth", "only_width", "only_shared"} <= names
    main = {e.name: e for e in exps if e.name in ("growclip", "fixed_small", "fixed_final")}
    assert all(len(e.seeds) >= 2 for e in main.values())
    assert main["fixed_final"].model_from == "growclip" and main["fixed_small"].match_compute == "growclip"
    for e in exps:
        for seed in e.seeds:
            run = RunSpec(e, seed, REPO / "configs" / "experiments" / base.name)
            if e.needs:  # derived runs wait for their reference run
                with pytest.raises(RuntimeError, match="growclip_s"):
                    resolve_run(run, tmp_path)
                continue
            cfg = resolve_run(run, tmp_path)
            assert cfg.name == run.name and cfg.train.seed == seed and cfg.run_root == tmp_path
    only_shared = next(e for e in exps if e.name == "only_shared")
    assert resolve_run(RunSpec(only_shared, 0, base), tmp_path).growth.axes == ("shared_depth",)


def test_bad_suites_are_refused(tmp_path: Path) -> None:
    bad = {
        "experiments: {a: {sett: []}}": "unknown keys \\['sett'\\]",
        "experiments: {a: {model_from: b}}": "unknown experiment 'b'",
        "experiments: {a: {}, b: {oracle_of: a, set: []}}": "oracle_of trains the candidates of another run",
        "experiments: {a: {seeds: [0]}, b: {seeds: [0, 1], match_compute: a}}": "needs a for seeds \\[1\\]",
        "bogus: 1": "unknown top-level keys",
    }
    for text, match in bad.items():
        path = tmp_path / "suite.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_suite(path)
    with pytest.raises(ConfigError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def _fake_reference(run_dir: Path, specs: list[dict], samples: list[int], search_flops: int) -> None:
    for t, (spec, n) in enumerate(zip(specs, samples, strict=True), 1):
        train = RunDir(run_dir).stage(t).train.path
        train.mkdir(parents=True)
        (train / "spec.json").write_text(json.dumps(spec))
        (train / "events.jsonl").write_text(json.dumps({"event": "end", "samples": n, "step": n // 64}) + "\n")
    metrics = RunDir(run_dir).stage(len(specs)).eval_metrics
    metrics.parent.mkdir()
    metrics.write_text("{}")
    cand = RunDir(run_dir).stage(2).cand(0)
    cand.path.mkdir(parents=True)
    cand.result_json.write_text(json.dumps({"train_flops": search_flops}))


def test_derived_runs_take_the_final_architecture_and_the_same_compute(tmp_path: Path) -> None:
    base, exps = load_suite(REPO / SUITE)
    base_cfg = load_cfg(base)
    by_name = {e.name: e for e in exps}
    partial = tmp_path / "growclip_s1" / "stage_01" / "train"
    partial.mkdir(parents=True)
    (partial / "spec.json").write_text(json.dumps(base_cfg.model.to_dict()))
    with pytest.raises(RuntimeError, match="has not finished"):  # a reference still running is not used
        resolve_run(RunSpec(by_name["fixed_small"], 1, base), tmp_path)
    shutil.rmtree(tmp_path / "growclip_s1")
    grown = base_cfg.model.with_changes(image={"depth": base_cfg.model.image.depth + 1})
    specs = [base_cfg.model.to_dict(), grown.to_dict(), grown.to_dict()]
    _fake_reference(tmp_path / "growclip_s1", specs, [51200, 51200, 51200], search_flops=10**12)
    total = total_compute(tmp_path / "growclip_s1")
    expected = base_cfg.model.flops_per_sample() * 51200 + 2 * grown.flops_per_sample() * 51200 + 10**12
    assert total == {"search_flops": 10**12, "train_flops": expected - 10**12, "total_flops": expected}
    final = resolve_run(RunSpec(by_name["fixed_final"], 1, base), tmp_path)
    assert final.model == grown and final.growth.axes == ()
    assert final.train.steps == round(expected / (grown.flops_per_sample() * 64 * 3))
    small = resolve_run(RunSpec(by_name["fixed_small"], 1, base), tmp_path)
    assert small.model == base_cfg.model
    assert small.train.steps == round(expected / (base_cfg.model.flops_per_sample() * 64 * 3)) > final.train.steps


def test_mini_suite_end_to_end(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"base: {tiny_pipeline_config}\nseeds: [0]\nexperiments:\n"
        "  growclip: {about: tiny growth, set: []}\n"
        "  fixed_final: {about: tiny fixed, set: ['growth.axes=[]'], model_from: growclip, match_compute: growclip}\n"
        "  oracle: {about: the oracle of growclip, oracle_of: growclip}\n"
    )
    root, out = tmp_path / "runs", tmp_path / "docs" / "results.md"
    env = {**os.environ, "GROWCLIP_LOG_LEVEL": "INFO"}  # the runner's lines are asserted on
    common = ["--suite", str(suite), "--root", str(root), "--set", "data.stages=2"]
    run = subprocess.run(
        [sys.executable, "-m", "jobs.experiments", "run", *common, "--jobs", "2", "--threads", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in root.glob("logs/*.log"))
    assert "matching growclip_s0" in run.stderr
    summ = subprocess.run(
        [sys.executable, "-m", "jobs.experiments", "summarize", *common, "--out", str(out)]
        + ["--plots", str(tmp_path / "docs" / "results"), "--note", "test machine"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert summ.returncode == 0, summ.stderr[-3000:]
    page = out.read_text()
    assert "test machine" in page and (tmp_path / "docs" / "results" / "report.md").exists()
    assert "GrowCLIP > best fixed (fixed_final), zero-shot: growclip" in page
    for name in ("growclip", "fixed_final"):
        final = load_run(root / f"{name}_s0")["stages"][-1]
        ev = json.loads((root / f"{name}_s0" / "stage_02" / "eval" / "metrics.json").read_text())
        assert final["mean_acc1"] == ev["summary"]["mean_acc1"]
        row = re.search(rf"^\| {name} \| 1 \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", page, re.M)
        assert row is not None, page
        assert float(row.group(1)) == pytest.approx(100 * ev["summary"]["mean_acc1"], abs=0.05)
    # the fixed baseline spent the growth run's compute (to within one step of its batch)
    grow_total = total_compute(root / "growclip_s0")["total_flops"]
    fixed = total_compute(root / "fixed_final_s0")
    assert fixed["search_flops"] == 0
    per_step = load_cfg(root / "configs" / "fixed_final_s0.yaml").model.flops_per_sample() * 16 * 2
    assert abs(fixed["train_flops"] - grow_total) <= per_step
    # a second run skips both finished runs
    again = subprocess.run(
        [sys.executable, "-m", "jobs.experiments", "run", *common],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and again.stderr.count("already finished: skipped") == 3, again.stderr[-2000:]
    # the oracle experiment graded growclip's stage 2: its summary is in the run dir and on the page
    summary = json.loads((root / "growclip_s0" / "stage_02" / "oracle" / "summary.json").read_text())
    assert summary["missing"] == [] and len(summary["candidates"]) == 3
    assert "## Search fidelity (oracle)" in page and f"| growclip | 0 | 2 | 3 | {summary['chosen']} |" in page
    # ... with learning curves, graded by jobs fidelity (issue #17), and the why-not table against the fixed run
    curves = [
        json.loads(p.read_text())["curve"]
        for p in (root / "growclip_s0" / "stage_02" / "oracle").glob("cand_*/result.json")
    ]
    assert len(curves) == 3 and all([pt["step"] for pt in c] == [3, 6] for c in curves)
    assert (root / "growclip_s0" / "stage_02" / "oracle" / "fidelity.json").exists()
    assert "| loss | 20 | 1 |" in page.split("## Search estimators")[1]  # one graded stage, one seed
    assert "## Why (not)" in page and "| 0 | " in page.split("## Why (not)")[1]
    # --graded: another run's grades join the estimator table (here a copy of the same run: n doubles)
    shutil.copytree(root / "growclip_s0", tmp_path / "study")
    again = [sys.executable, "-m", "jobs.experiments", "summarize", *common, "--out", str(out)]
    again += ["--plots", str(tmp_path / "docs" / "results")]
    more = subprocess.run(again + ["--graded", str(tmp_path / "study")], cwd=REPO, capture_output=True, text=True)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "| loss | 20 | 2 |" in out.read_text().split("## Search estimators")[1]
    bad = subprocess.run(again + ["--graded", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "not a run dir" in bad.stderr


def test_verdicts_need_a_measured_spread() -> None:
    from jobs.engine.results import _verdict

    def exp(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        return {"runs": values, "stat": {"mean_acc1": (mean, sd)}}

    two_a, two_b, one = exp([0.30, 0.32]), exp([0.20, 0.21]), exp([0.305])
    assert "**held**" in _verdict("a", two_a, two_b, "mean_acc1", "x", floor=0.0)
    assert "**did not hold**" in _verdict("b", two_b, two_a, "mean_acc1", "x", floor=0.0)
    assert "**within noise**" in _verdict("a", two_a, one, "mean_acc1", "x", floor=0.05)
    assert "not resolved (no seed spread measured)" in _verdict("a", exp([0.3]), one, "mean_acc1", "x", floor=0.0)


def test_report_labels_are_distinct_even_for_same_named_run_dirs() -> None:
    from jobs.engine.report import _labels

    runs = [{"name": "g", "run_dir": "/a/g_s0"}, {"name": "g", "run_dir": "/b/g_s0"}, {"name": "h", "run_dir": "/c"}]
    labels = _labels(runs)
    assert len(set(labels)) == 3 and labels[2] == "h"
