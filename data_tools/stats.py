"""``stats``: per-stage counts, drop reasons and caption lengths (from the manifest and shard stats)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.manifest import load_manifest

__all__ = ["compute_stats", "render_stats"]

logger = logging.getLogger(__name__)


def _summary(words: list[int]) -> dict[str, float]:
    if not words:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    arr = np.asarray(words, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "mean": round(float(arr.mean()), 3),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
    }


def compute_stats(data_root: str | Path) -> dict[str, Any]:
    """Per-stage and total statistics of a corpus.

    Caption lengths are in words (whitespace-separated), read from the per-shard ``*_stats.json``.
    """
    root = Path(data_root)
    manifest = load_manifest(root, missing_ok=False)
    stages = []
    all_words: list[int] = []
    for entry in manifest["stages"]:
        words: list[int] = []
        for sh in entry["shards"]:
            stats_path = root / sh["name"].replace(".tar", "_stats.json")
            if stats_path.exists():
                words += json.loads(stats_path.read_text())["caption_words"]
            else:
                logger.warning("%s missing: caption lengths of that shard are left out", stats_path)
        all_words += words
        inputs = sum(s.get("records", 0) for s in entry.get("sources", []))
        stages.append(
            {
                "stage": entry["stage"],
                "samples": entry["count"],
                "shards": len(entry["shards"]),
                "inputs": inputs,
                "dropped": sum(entry.get("drops", {}).values()),
                "drops": entry.get("drops", {}),
                "caption_words": _summary(words),
                "sources": [s["path"] for s in entry.get("sources", [])],
            }
        )
    return {
        "data_root": str(root),
        "stages": stages,
        "total": {
            "samples": sum(s["samples"] for s in stages),
            "shards": sum(s["shards"] for s in stages),
            "unique_hashes": manifest.get("dedupe", {}).get("unique", 0),
            "caption_words": _summary(all_words),
        },
    }


def render_stats(stats: dict[str, Any]) -> str:
    """Human-readable table of ``compute_stats`` output."""
    cols = f"{'stage':>5} {'samples':>8} {'shards':>6} {'inputs':>7} {'dropped':>7}"
    lines = [f"{cols}  {'caption words mean/p50/p90/max':<31} drops"]
    for s in stats["stages"]:
        c = s["caption_words"]
        drops = ", ".join(f"{k}={v}" for k, v in sorted(s["drops"].items())) or "-"
        words = f"{c['mean']:.1f}/{c['p50']:.0f}/{c['p90']:.0f}/{c['max']:.0f}"
        cols = f"{s['stage']:>5} {s['samples']:>8} {s['shards']:>6} {s['inputs']:>7} {s['dropped']:>7}"
        lines.append(f"{cols}  {words:<31} {drops}")
    t = stats["total"]
    lines.append(
        f"{'total':>5} {t['samples']:>8} {t['shards']:>6}  caption words mean {t['caption_words']['mean']:.1f}"
    )
    return "\n".join(lines)
