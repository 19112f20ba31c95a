"""Small helpers shared by several test modules (bounded waits, SLURM queue queries)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "bounded",
    "encode_image",
    "stage_samples",
    "tar_samples",
    "grey_rgb",
    "release_if_held",
    "sbatch_script",
    "seeds_from_env",
    "squeue",
    "stop_at",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[1]


def bounded(fn: Callable[[], Any], seconds: float = 60.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds}s (spinning?)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def wait_for(what: str, cond: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); fail naming ``what`` after ``timeout`` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def squeue(job_id: str) -> str:
    """``STATE REASON`` of a SLURM job ("" once it has left the queue)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def release_if_held(job_id: str, since: float, after: float = 5.0) -> str:
    """``squeue`` state of a job; one requeued and held on ``Reason=BeginTime`` for more than ``after`` s since
    ``since`` is released (``scontrol update StartTime=now``: slurmctld holds requeued jobs a while)."""
    state = squeue(job_id)
    if state.startswith("PENDING") and "BeginTime" in state and time.time() - since > after:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
    return state


def sbatch_script(script: str, args: list[str], options: list[str]) -> str:
    """``sbatch`` one of ``slurm/*.sbatch`` as a user would, sized for the local 2-CPU cluster; returns the job id.

    ``GROWCLIP_REPO``/``GROWCLIP_PYTHON`` point the script at this checkout and interpreter; ``options`` go
    before the script (they override its ``#SBATCH`` lines)."""
    env = {**os.environ, "GROWCLIP_REPO": str(REPO), "GROWCLIP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    argv = ["sbatch", "--parsable", "--gres=none", "--mem=2G", "--cpus-per-task=1", *options]
    proc = subprocess.run(
        [*argv, str(REPO / "slurm" / script), *args], cwd=REPO, capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def stop_at(step: int) -> Callable[[], bool]:
    """A trainer ``should_stop`` that turns True at the boundary before optimizer step ``step + 1``."""
    calls = {"n": -1}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == step

    return should_stop


def seeds_from_env(name: str, defaults: list[int]) -> list[int]:
    """Seeds of a randomised test: ``defaults`` (fixed, so that CI is deterministic) unless the environment
    variable ``name`` is set to a seed (a replay), a comma-separated list of them, or ``random`` (a fresh one,
    for exploring: ``make fuzz``)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return list(defaults)
    if value == "random":
        return [random.SystemRandom().randrange(10**6)]
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a seed, a comma-separated list of seeds, or 'random'") from None


def grey_rgb(a: Any) -> Any:
    """A greyscale float array as the 8-bit RGB array a faithful conversion gives (rounded, clipped)."""
    import numpy as np

    return np.repeat(np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def encode_image(img: Any, fmt: str, **kw: Any) -> bytes:
    """``img`` (a PIL image) encoded as ``fmt`` in memory."""
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """The members of a webdataset tar grouped by key: ``{key: {ext: bytes}}``."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


def stage_samples(root: Path, stage: int) -> dict[str, dict[str, Any]]:
    """Every sample of a corpus stage by its input source id: ``{"txt": str, "jpg": bytes, "meta": dict}``."""
    import json

    from data_tools.manifest import load_manifest

    out: dict[str, dict[str, Any]] = {}
    entry = next(e for e in load_manifest(root)["stages"] if e["stage"] == stage)
    for shard in entry["shards"]:
        for p in tar_samples(root / shard["name"]).values():
            meta = json.loads(p["json"])
            out[meta["source"]] = {"txt": p["txt"].decode("utf-8"), "jpg": p["jpg"], "meta": meta}
    return out


AUTOPILOT_YAML = """\
name: autopilot
run_root: {tmp}/runs
data: {{root: {tmp}/data, stages: 1, replay_fraction: 0.5, val_fraction: 0.1, num_workers: 0, shuffle_buffer: 16}}
model:
  image: {{image_size: 16, patch_size: 4, width: 32, depth: 1, heads: 2, mlp_ratio: 2.0}}
  text: {{vocab_size: 300, context_length: 16, width: 32, depth: 1, heads: 2, mlp_ratio: 2.0}}
  shared: {{width: 32, depth: 0, heads: 2}}
  embed_dim: 32
growth: {{max_candidates: 2}}
search: {{steps: 4, batch_size: 16, val_samples: 16, warmup_steps: 1}}
train: {{steps: 6, batch_size: 16, warmup_steps: 1, checkpoint_every: 6, log_every: 2}}
eval: {{batch_size: 64, heldout_samples: 16, tasks: [fashion_mnist]}}
cluster: {{executor: {executor}, cpus_per_task: 1, mem_gb: 2, train_time_min: 10, search_time_min: 10,
          eval_time_min: 10, signal_delay_s: 30}}
autopilot: {{inbox: {tmp}/inbox, min_growth: 1.5, poll_s: {poll_s}, time_min: 10,
            ingest_args: ["--image-size", "16", "--shard-size", "50"]}}
"""


def autopilot_setup(tmp: Path, eval_dir: Path, executor: str, poll_s: float = 1.0) -> Path:
    """A config for ``jobs autopilot`` on an empty DATA_ROOT (its eval sets linked from ``eval_dir``) and an
    empty inbox under ``tmp``; returns the config's path. Crawls: :func:`drop_crawl`."""
    (tmp / "inbox").mkdir(parents=True)
    (tmp / "data").mkdir()
    (tmp / "data" / "eval").symlink_to(eval_dir)
    path = tmp / "autopilot.yaml"
    path.write_text(AUTOPILOT_YAML.format(tmp=tmp, executor=executor, poll_s=poll_s))
    return path


def drop_crawl(inbox: Path, name: str, pairs: int, seed: int, marker: bool = True) -> Path:
    """An img2dataset crawl (webdataset tars) written beside the inbox, then moved in, as a crawler finishes one."""
    import os

    from data_tools.synthetic import make_img2dataset_input

    tmp = inbox.parent / f".writing_{name}"
    make_img2dataset_input(tmp, pairs, seed=seed)
    if marker:
        (tmp / "_SUCCESS").touch()
    os.replace(tmp, inbox / name)
    return inbox / name
