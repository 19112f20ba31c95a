"""The tokenizer belongs to the run (issue #18 item 4, jobs/engine/tokens.py): copied into the run dir, its hash
in every checkpoint, a changed or foreign tokenizer refused with both named; data.tokenizer: clip trains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.config import ConfigError, load_cfg
from jobs.engine.dist import DistEnv
from jobs.engine.tokens import checkpoint_tokenizer, text_sha256
from jobs.engine.trainer import run_training

REPO = Path(__file__).resolve().parents[1]


def _corpus_copy(tiny_corpus: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_corpus, root)
    return root


def test_training_keeps_its_tokenizer_and_refuses_another(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    root = _corpus_copy(load_cfg(tiny_pipeline_config).data.root, tmp_path)
    cfg = load_cfg(tiny_pipeline_config, [f"data.root={root}"])
    run = tmp_path / "run"
    res = run_training(cfg, 1, run, DistEnv(), progress=False)
    own = run / "tokenizer.json"
    assert own.read_text() == (root / "tokenizer.json").read_text()
    final = torch.load(res.final, weights_only=True)
    assert final["tokenizer_sha256"] == text_sha256(own.read_text())
    # evaluate/export find the run's copy from the checkpoint's path, and refuse a foreign one, naming both
    assert checkpoint_tokenizer(res.final, final, None, None) == own
    other = tmp_path / "other.json"
    other.write_text(own.read_text().replace('"<pad>"', '"<pad2>"'))
    with pytest.raises(ConfigError, match=rf"{res.final.name}.*{other}"):
        checkpoint_tokenizer(res.final, final, other, None)
    cli = [sys.executable, "-m", "jobs", "evaluate", "--checkpoint", str(res.final), "--data-root", str(root)]
    proc = subprocess.run([*cli, "--tokenizer", str(other)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "trained with a tokenizer of sha256" in proc.stderr and str(other) in proc.stderr
    # the corpus's tokenizer changes under an interrupted run: its resume goes on with the run's own copy
    (root / "tokenizer.json").write_text(other.read_text())
    for done in (res.final, res.final.with_name(res.final.name + ".sha256")):
        done.unlink()  # as if killed before the end: the step checkpoints remain
    again = run_training(cfg, 1, run, DistEnv(), progress=False)
    assert torch.load(again.final, weights_only=True)["tokenizer_sha256"] == final["tokenizer_sha256"]
    assert text_sha256(own.read_text()) == final["tokenizer_sha256"]
    # a new run on the changed corpus cannot start from the old run's weights, and claims nothing
    with pytest.raises(ConfigError, match=r"trained with a tokenizer of sha256"):
        run_training(cfg, 2, tmp_path / "run2", DistEnv(), init=again.final, progress=False)
    assert not (tmp_path / "run2" / "tokenizer.json").exists()
    # a work dir inside the run (a search candidate's, the oracle's) inherits the run's tokenizer by its hash
    work = run / "stage_02" / "search" / "cand_00" / "work"
    grown = run_training(cfg, 2, work, DistEnv(), init=again.final, progress=False)
    assert (work / "tokenizer.json").read_text() == own.read_text() and grown.status == "completed"


def test_a_tokenizer_without_the_model_s_specials_is_refused(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    corpus = load_cfg(tiny_pipeline_config).data.root / "tokenizer.json"
    bad = tmp_path / "no_eot.json"
    bad.write_text(corpus.read_text().replace('"<end_of_text>"', '"<eot>"'))
    cfg = load_cfg(tiny_pipeline_config, [f"data.tokenizer={bad}", "train.steps=2"])
    with pytest.raises(ConfigError, match=r"no_eot\.json has no <end_of_text> token"):
        run_training(cfg, 1, tmp_path / "run", DistEnv(), progress=False)
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_clip_tokenizer_trains(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """data.tokenizer: clip — CLIP's BPE (49,408 ids) copied into the run; a model too small for it is refused."""
    small = load_cfg(tiny_pipeline_config, ["data.tokenizer=clip", "train.steps=2"])
    with pytest.raises(ConfigError, match=r"49408 tokens but model\.text\.vocab_size"):
        run_training(small, 1, tmp_path / "small", DistEnv(), progress=False)
    cfg = load_cfg(tiny_pipeline_config, ["data.tokenizer=clip", "model.text.vocab_size=49408", "train.steps=2"])
    res = run_training(cfg, 1, tmp_path / "run", DistEnv(), progress=False)
    from data_tools.clip_bpe import build_clip_tokenizer

    own = (tmp_path / "run" / "tokenizer.json").read_text()
    assert res.status == "completed" and own == build_clip_tokenizer().to_str()
    assert torch.load(res.final, weights_only=True)["tokenizer_sha256"] == text_sha256(own)


def test_tokenizer_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.bpe.: use corpus, clip or the path of a tokenizer\.json"):
        load_cfg(None, ["data.tokenizer=bpe"])
