"""Shared pytest fixtures and markers."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# --- slurm: the local single-node cluster of slurm/local/up --------------------------------------
# Tests marked `slurm` take the `slurm_cluster` fixture. Without a responding cluster they are
# skipped, or they fail when GROWCLIP_REQUIRE_SLURM=1 (CI sets it, so a broken cluster cannot pass
# silently as "skipped").

REQUIRE_SLURM_ENV = "GROWCLIP_REQUIRE_SLURM"
SLURM_DIR_ENV = "GROWCLIP_SLURM_DIR"
DEFAULT_SLURM_DIR = "/var/tmp/growclip-slurm"
_READY_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


@dataclass(frozen=True)
class SlurmCluster:
    """A responding SLURM cluster: its slurm.conf and the node states sinfo reported."""

    conf: Path
    node_states: tuple[str, ...]

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for subprocesses."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _slurm_conf_path() -> Path:
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    return Path(os.environ.get(SLURM_DIR_ENV) or DEFAULT_SLURM_DIR) / "slurm.conf"


def _controller_refuses(conf: Path) -> str:
    """Quick check (sinfo needs ~9 s to give up): a reason when nothing listens on slurmctld's port."""
    try:
        text = conf.read_text()
    except OSError as exc:
        return f"cannot read {conf}: {exc}"
    host = re.search(r"^\s*SlurmctldHost\s*=\s*([^\s(#]+)", text, flags=re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)\s*$", text, flags=re.M | re.I)
    if not host or not port:
        return ""  # unusual config (port range, several controllers): leave it to sinfo
    try:
        with socket.create_connection((host.group(1), int(port.group(1))), timeout=2):
            return ""
    except ConnectionRefusedError:
        return f"slurmctld is not listening on {host.group(1)}:{port.group(1)}"
    except OSError:
        return ""  # unreachable/slow name resolution: let sinfo decide


def _probe_slurm() -> tuple[SlurmCluster | None, str]:
    """Find the cluster and check that sinfo answers; return (cluster, "") or (None, reason)."""
    conf = _slurm_conf_path()
    hint = "start it with slurm/local/up"
    if not conf.is_file():
        return None, f"no SLURM cluster: {conf} does not exist ({hint})"
    refused = _controller_refuses(conf)
    if refused:
        return None, f"no SLURM cluster: {refused} (SLURM_CONF={conf}; {hint})"
    if shutil.which("sinfo") is None:
        return None, f"no SLURM cluster: sinfo is not installed ({hint})"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"],
            env={**os.environ, "SLURM_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"no SLURM cluster: sinfo did not answer within 30 s (SLURM_CONF={conf}; {hint})"
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return (
            None,
            f"no SLURM cluster: sinfo failed (SLURM_CONF={conf}): {err[-1] if err else proc.returncode} ({hint})",
        )
    states = tuple(s.strip().rstrip("*~#!%$@^-") for s in proc.stdout.split() if s.strip())
    if not any(s in _READY_NODE_STATES for s in states):
        return None, f"SLURM cluster at {conf} has no usable node (sinfo states: {states or 'none'}; {hint})"
    return SlurmCluster(conf=conf, node_states=states), ""


def _slurm_required() -> bool:
    return os.environ.get(REQUIRE_SLURM_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@pytest.fixture(scope="session")
def _slurm_probe() -> tuple[SlurmCluster | None, str]:
    return _probe_slurm()


@pytest.fixture
def slurm_cluster(_slurm_probe: tuple[SlurmCluster | None, str], monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The local SLURM cluster, with SLURM_CONF set in os.environ for the test; skip (or fail) without one."""
    cluster, reason = _slurm_probe
    if cluster is None:
        if _slurm_required():
            pytest.fail(f"{reason} [{REQUIRE_SLURM_ENV}=1]", pytrace=False)
        pytest.skip(reason)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


# --- end of slurm section -------------------------------------------------------------------------


# --- train: a tiny offline corpus and run config for the training/evaluation tests (issue #5) -----
# One small corpus per session (build-offline, 16 px images, ~8 s), shared by tests/test_train_*.py
# and tests/test_evaluate.py. Skipped with the Debian package names when the offline sources are
# missing (see `make data-sources`).

TINY_TRAIN_YAML = """\
name: tiny
data: {{root: {root}, stages: 3, replay_fraction: 0.5, val_fraction: 0.05, num_workers: 0, shuffle_buffer: 64, seed: 0}}
model:
  image: {{image_size: 16, patch_size: 4, width: 32, depth: 2, heads: 2, mlp_ratio: 2.0}}
  text: {{vocab_size: {vocab}, context_length: 16, width: 32, depth: 2, heads: 2, mlp_ratio: 2.0}}
  shared: {{width: 32, depth: 0, heads: 2}}
  embed_dim: 32
train: {{steps: 40, batch_size: 32, lr: 1.0e-3, warmup_steps: 5, weight_decay: 0.1, checkpoint_every: 10,
        keep_checkpoints: 3, log_every: 1, seed: 0}}
eval: {{batch_size: 256}}
cluster: {{executor: slurm, cpus_per_task: 1, mem_gb: 2, train_time_min: 30, search_time_min: 10, eval_time_min: 10,
          signal_delay_s: 30}}
"""


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-stage offline corpus (200 pairs/stage, 16 px, 100 images per eval task) with its tokenizer."""
    from data_tools.offline import build_offline, check_sources

    missing = check_sources()
    if missing:
        pytest.skip("offline sources missing: " + "; ".join(missing))
    root = tmp_path_factory.mktemp("train_corpus") / "data"
    build_offline(root, stages=3, pairs_per_stage=200, eval_per_task=100, image_size=16, workers=2, vocab_size=512)
    return root


def _corpus_config(template: str, corpus: Path, path: Path) -> Path:
    """Write ``template`` formatted with the corpus root and its tokenizer's vocabulary size."""
    from data_tools.tokenizer import load_tokenizer

    vocab = load_tokenizer(corpus / "tokenizer.json").get_vocab_size()
    path.write_text(template.format(root=corpus, vocab=vocab))
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs-style YAML for the tiny spec on ``tiny_corpus`` (40 steps, checkpoint every 10, log every step)."""
    return _corpus_config(TINY_TRAIN_YAML, tiny_corpus, tmp_path_factory.mktemp("train_cfg") / "tiny.yaml")


@dataclass(frozen=True)
class TrainedRun:
    """A finished CLI training of the tiny spec (stage 1, 200 steps of 64): run dir, config, output."""

    run_dir: Path
    config: Path
    seconds: float
    stderr: str

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "stage_01" / "train"


@pytest.fixture(scope="session")
def trained_run(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """``python -m jobs train`` for 200 steps (batch 64), evaluation included (~15 s on 2 cores)."""
    import sys
    import time

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = ["--set", "train.steps=200", "--set", "train.batch_size=64", "--set", "train.warmup_steps=20"]
    args += ["--set", "train.checkpoint_every=50", "--set", "train.log_every=5"]
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "train", "--config", str(tiny_config), "--stage", "1", "--run-dir", str(run_dir)]
        + args,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedRun(run_dir, tiny_config, time.time() - t0, proc.stderr)


# --- end of train section -------------------------------------------------------------------------


# --- pipeline: tiny growth plans for tests/test_pipeline_*.py (issue #6) --------------------------
# The tiny spec at depth 1, three candidates (none, image_depth, text_depth), a few steps each: a
# 2-stage plan is ~10 s in-process and ~40 s through the local SLURM.

TINY_PIPELINE_YAML = """\
name: tinygrow
data: {{root: {root}, stages: 3, replay_fraction: 0.5, val_fraction: 0.1, num_workers: 0, shuffle_buffer: 64, seed: 0}}
model:
  image: {{image_size: 16, patch_size: 4, width: 32, depth: 1, heads: 2, mlp_ratio: 2.0}}
  text: {{vocab_size: {vocab}, context_length: 16, width: 32, depth: 1, heads: 2, mlp_ratio: 2.0}}
  shared: {{width: 32, depth: 0, heads: 2}}
  embed_dim: 32
growth: {{axes: [image_depth, text_depth], depth_step: 1, max_ops: 1, max_candidates: 3}}
search: {{steps: 4, batch_size: 16, lr: 1.0e-3, warmup_steps: 1, val_samples: 32, cost_weight: 0.05}}
train: {{steps: 6, batch_size: 16, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 3, keep_checkpoints: 2, log_every: 3}}
eval: {{batch_size: 256}}
cluster: {{executor: debug, cpus_per_task: 1, mem_gb: 2, train_time_min: 10, search_time_min: 10, eval_time_min: 10,
          signal_delay_s: 30, array_parallelism: 2}}
"""


@pytest.fixture(scope="session")
def tiny_pipeline_config(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A growth-plan YAML on ``tiny_corpus``: 3 candidates per stage, 4 search steps, 6 training steps."""
    return _corpus_config(TINY_PIPELINE_YAML, tiny_corpus, tmp_path_factory.mktemp("pipeline_cfg") / "tinygrow.yaml")


# --- end of pipeline section ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_root_logging():  # type: ignore[no-untyped-def]
    """The in-process CLIs (``jobs``, ``data_tools``, an autopilot poll) install a stderr handler on the root logger,
    on that test's captured stderr, closed after it: undo it after every test, or a later log line fails there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def inductor() -> None:
    """Skip when torch.compile cannot build a CPU kernel here (no inductor, no C compiler)."""
    import torch  # here: conftest itself stays light

    try:
        out = torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3))
    except Exception as exc:  # any backend failure: missing compiler, unsupported platform
        pytest.skip(f"torch.compile (inductor) cannot compile on this CPU: {type(exc).__name__}: {exc}"[:300])
    assert torch.equal(out, torch.full((3,), 3.0))
