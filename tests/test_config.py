"""Run-config loading: strict keys, types, ranges, overrides, round trip, CLI exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.config import RunCfg, dump_cfg, load_cfg
from model.structs import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_cfg(path)
    again = load_cfg(write(tmp_path, dump_cfg(cfg)))
    assert again == cfg


def test_demo_and_a100_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "a100.yaml"} <= names
    a100 = load_cfg(REPO / "configs" / "a100.yaml")
    assert (a100.model.image.width, a100.model.image.depth, a100.model.image.patch_size) == (768, 12, 16)
    assert a100.cluster.gpus_per_node == 8 and a100.cluster.nodes > 1


def test_defaults_and_empty_file(tmp_path: Path) -> None:
    assert load_cfg(None) == RunCfg()
    assert load_cfg(write(tmp_path, "")) == RunCfg()
    assert load_cfg(write(tmp_path, "# only a comment\n")) == RunCfg()


def test_config_is_frozen() -> None:
    cfg = load_cfg(None)
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("trian: {lr: 1.0}\n", ["trian", "Did you mean 'train'"]),
        ("train: {lrr: 1.0}\n", ["train.lrr", "Did you mean 'lr'", "TrainCfg"]),
        ("model: {image: {widht: 64}}\n", ["model.image.widht", "Did you mean 'width'"]),
        ("cluster: {partiton: gpu}\n", ["cluster.partiton", "Did you mean 'partition'"]),
        ("zzzz: 1\n", ["zzzz", "Valid keys"]),
    ],
)
def test_unknown_keys_name_key_and_closest(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_cfg(write(tmp_path, text))
    for needle in needles:
        assert needle.lower() in str(err.value).lower(), str(err.value)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("train: {steps: ten}\n", ["train.steps", "expected an integer"]),
        ("train: {steps: 10.5}\n", ["train.steps", "expected an integer"]),
        ("train: {steps: true}\n", ["train.steps", "expected an integer"]),
        ("train: {lr: fast}\n", ["train.lr", "expected a number"]),
        ("train: {grad_checkpointing: 1}\n", ["train.grad_checkpointing", "true or false"]),
        ("train: {optimizer: sgd}\n", ["train.optimizer", "'adamw', 'lamb'"]),
        ("train: {betas: 0.9}\n", ["train.betas", "list of float"]),
        ("name: [a, b]\n", ["name", "expected a string"]),
        ("data: 3\n", ["data", "expected a mapping"]),
        ("growth: {axes: [image_depth, text_dpth]}\n", ["growth.axes[1]", "Did you mean 'text_depth'"]),
        ("cluster: {extra_sbatch: {constraint: 3}}\n", ["cluster.extra_sbatch.constraint", "expected a string"]),
        ("- a\n- b\n", ["top level must be a mapping"]),
    ],
)
def test_wrong_types_say_what_is_expected(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_cfg(write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("train: {lr: -1.0}\n", ["train.lr=-1.0", "> 0"]),
        ("train: {lr: .inf}\n", ["train.lr=inf", "finite"]),
        ("train: {batch_size: 10, grad_accum: 3}\n", ["divisible by train.grad_accum=3"]),
        ("train: {betas: [0.9, 0.98, 0.1]}\n", ["train.betas", "two numbers"]),
        ("train: {steps: 10, warmup_steps: 20}\n", ["train.warmup_steps=20"]),
        ("data: {val_fraction: 1.0}\n", ["data.val_fraction=1.0", "(0, 1)"]),
        ("growth: {momentum: 1.5}\n", ["growth.momentum=1.5", "[0, 1]"]),
        ("growth: {width_factor: 1}\n", ["growth.width_factor=1"]),
        ("model: {image: {width: 64, heads: 3}}\n", ["image.heads=3 must divide image.width=64", "pick heads in"]),
        ("model: {image: {image_size: 30, patch_size: 8}}\n", ["multiple of image.patch_size=8"]),
        ("model: {shared: {depth: -1}}\n", ["shared.depth=-1"]),
        ("cluster: {search_time_min: 1, signal_delay_s: 90}\n", ["cluster.signal_delay_s=90"]),
        ("name: 'my run'\n", ["name='my run'"]),
        ("eval: {retrieval_ks: [1, 0]}\n", ["eval.retrieval_ks"]),
    ],
)
def test_out_of_range_values(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_cfg(write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {lr: 0.1}\n")
    cfg = load_cfg(
        path,
        [
            "train.lr=1e-4",
            "train.steps=7",
            "train.warmup_steps=0",
            "model.image.depth=5",
            "eval.retrieval_ks=[1, 3]",
            "cluster.setup=['module load cuda']",
            "cluster.extra_sbatch.constraint=a100",
            "growth.inherit_from=ema",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 7
    assert cfg.model.image.depth == 5
    assert cfg.eval.retrieval_ks == (1, 3)
    assert cfg.cluster.setup == ("module load cuda",)
    assert cfg.cluster.extra_sbatch == {"constraint": "a100"}
    assert cfg.growth.inherit_from == "ema"


def test_later_override_wins() -> None:
    assert load_cfg(None, ["train.warmup_steps=0", "train.steps=5", "train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.lrr=1", ["unknown key 'train.lrr'", "Did you mean 'train.lr'"]),
        ("trian.lr=1", ["unknown key 'trian'", "Did you mean 'train'"]),
        ("train.lr", ["expected section.key=value"]),
        ("train..lr=1", ["empty key segment"]),
        ("train.lr.x=1", ["not a section"]),
        ("train.lr=abc", ["train.lr", "expected a number"]),
        ("train.steps=[1", ["not valid YAML"]),
        ("model.image.heads=5", ["image.heads=5 must divide image.width=768"]),
    ],
)
def test_bad_overrides(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_cfg(None, [override])
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column \d+"):
        load_cfg(write(tmp_path, "train:\n  lr: 1\n bad\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_cfg(Path("/nonexistent/run.yaml"))


def test_dump_is_plain_yaml() -> None:
    data = yaml.safe_load(dump_cfg(load_cfg(None)))
    sections = {"name", "run_root", "data", "model", "growth", "search", "train", "eval", "cluster", "autopilot"}
    assert set(data) == sections
    assert data["data"]["root"] == "data/offline"
    assert data["model"]["shared"]["depth"] == 0


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "train: {steps: 12, warmup_steps: 2}\n")
    assert main(["check-config", str(path), "--set", "train.lr=2e-3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 12 and out["train"]["lr"] == pytest.approx(2e-3)

    assert main(["check-config", str(path), "--set", "train.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Did you mean 'train.lr'" in captured.err


def test_check_config_subprocess_exit_codes(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "jobs", "check-config"]
    ok = subprocess.run([*run, str(REPO / "configs" / "demo.yaml")], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_cfg(write(tmp_path, ok.stdout)) == load_cfg(REPO / "configs" / "demo.yaml")
    bad = subprocess.run([*run, str(write(tmp_path, "train: {stepz: 1}\n"))], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "train.stepz" in bad.stderr and "Did you mean 'steps'" in bad.stderr


def test_stored_run_config_missing_a_new_default_key_is_the_same_config(tmp_path: Path) -> None:
    from jobs.config import config_differences

    cfg = load_cfg(REPO / "configs" / "demo.yaml")
    stored = tmp_path / "config.yaml"
    stored.write_text(dump_cfg(cfg).replace("  grad_clip: 1.0\n", ""))  # written before grad_clip existed
    assert stored.read_text() != dump_cfg(cfg) and config_differences(load_cfg(stored), cfg) == []
    stored.write_text(dump_cfg(cfg).replace("  grad_clip: 1.0\n", "  grad_clip: 2.0\n"))
    assert config_differences(load_cfg(stored), cfg) == ["train.grad_clip: 2.0 -> 1.0"]
    launch = load_cfg(REPO / "configs" / "demo.yaml", ["cluster.mem_gb=99", "name=other"])
    assert config_differences(launch, cfg) == []  # how and where it is launched is not another config
    # what the failure messages advise for a re-run (full disk, out of memory) is not another config either
    recovery = ["train.keep_checkpoints=1", "train.grad_accum=2", "train.grad_checkpointing=true"]
    assert config_differences(load_cfg(REPO / "configs" / "demo.yaml", recovery), cfg) == []
    assert config_differences(load_cfg(REPO / "configs" / "demo.yaml", ["train.batch_size=32"]), cfg) != []


def test_yaml_merge_keys_load_and_unhashable_keys_are_named(tmp_path: Path) -> None:
    merged = load_cfg(write(tmp_path, "train:\n  <<: {lr: 0.002}\n  steps: 50\n  warmup_steps: 5\n"))
    assert merged.train.lr == 0.002 and merged.train.steps == 50
    with pytest.raises(ConfigError, match="line 1: a key must be a name, got a list"):
        load_cfg(write(tmp_path, "? [a, b]\n: 1\n"))


def test_every_executor_has_a_cluster_and_a_cli_choice() -> None:
    """One name per executor: the config's Literal, jobs.cluster.CLUSTERS and the --executor choices agree."""
    from jobs.cli import build_parser
    from jobs.cluster import CLUSTERS
    from jobs.config import EXECUTORS

    assert set(CLUSTERS) == set(EXECUTORS)
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    choices = {
        verb: opt.choices for verb, sub in verbs.items() for opt in sub._actions if "--executor" in opt.option_strings
    }
    assert {"plan", "submit", "oracle", "submit-train"} <= set(choices)
    assert all(tuple(c) == EXECUTORS for c in choices.values()), choices
