"""Shared pytest fixtures and markers."""

from __future__ import annotations

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
