"""Evaluation (issue #5): metric definitions on hand-made tensors; the CLI on the offline eval suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.engine.evaluate import classification_metrics, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]


def test_classification_metrics() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(logits, labels, ks=(1, 2, 5))
    assert m["acc1"] == pytest.approx(0.5) and m["acc2"] == 1.0 and m["acc5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 1 / 3) / 2)  # classes present: 0 and 1
    assert m["chance_acc1"] == pytest.approx(1 / 3)


def test_retrieval_metrics_with_several_captions_per_image() -> None:
    img = torch.eye(3)
    # captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2 (but caption 3 looks more like image 0)
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0.8, 0, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # every image's best caption is one of its own (image 2: caption 3 at 0.1 > 0)
    assert m["image_to_text_R@1"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(3 / 4)  # caption 3 ranks image 0 first
    assert m["text_to_image_R@2"] == pytest.approx(1.0)


def test_evaluate_cli_beats_chance_after_short_training(trained_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from jobs.config import load_cfg

    data_root = load_cfg(trained_run.config).data.root
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "evaluate", "--checkpoint", str(trained_run.train_dir / "final.pt"),
         "--data-root", str(data_root), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["format"] == "growclip-eval" and result["step"] == 200
    tasks = result["tasks"]
    assert len(tasks) == 7 and tasks["emoji_retrieval"]["captions"] == 5 * tasks["emoji_retrieval"]["images"]
    for name, r in tasks.items():
        if r["type"] == "classification":
            assert {"acc1", "acc5", "mean_per_class_recall"} <= set(r), name
        else:
            assert {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} <= set(r)
    # stage-1 data is clothing, digits and coloured shapes: those tasks must beat chance clearly
    # (measured after 200 steps: fashion_mnist ~0.3 vs 0.1, colour_shape ~0.25 vs 0.083)
    for name in ("fashion_mnist", "colour_shape"):
        r = tasks[name]
        assert r["acc1"] > 1.8 * r["chance_acc1"], (name, r)
    # the end-of-training evaluation wrote the same numbers
    at_end = json.loads((trained_run.run_dir / "stage_01" / "eval" / "metrics.json").read_text())
    assert at_end["tasks"]["fashion_mnist"]["acc1"] == pytest.approx(tasks["fashion_mnist"]["acc1"])
