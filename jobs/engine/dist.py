"""Distributed set-up: the ONE place that reads rank and world size from the environment (R12).

Sources, in order:

1. torchrun / ``submitit.helpers.TorchDistributedEnvironment().export()``: ``RANK``, ``LOCAL_RANK``,
   ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. ``srun`` without a launcher: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``; the master is
   the first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``), the port derived from the
   job id.
3. Nothing set: a single process.

The backend is NCCL on CUDA and gloo on CPU. Library code receives a :class:`DistEnv` value.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "world_info_from_env", "init_distributed", "cleanup_distributed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, rank on its node, number of ranks, device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as ``node[01-04]``; plain names need no scontrol."""
    if "[" not in nodelist and "," not in nodelist:
        return nodelist
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.split()[0]


def world_info_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int, dict[str, str]]:
    """(rank, local_rank, world_size, rendezvous) from torchrun or SLURM variables (module docstring).

    ``rendezvous`` holds the ``MASTER_ADDR``/``MASTER_PORT`` to export when they came from SLURM.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]), {}
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if ntasks > 1 and "SLURM_PROCID" in env:
        rdzv = {}
        if "MASTER_ADDR" not in env:
            rdzv["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        if "MASTER_PORT" not in env:
            rdzv["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), ntasks, rdzv
    return 0, 0, 1, {}


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the environment, pick the device, and start the process group when world_size > 1.

    Args:
        device: ``"auto"`` (CUDA ``local_rank`` when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistEnv` of this process.
    """
    rank, local_rank, world_size, rdzv = world_info_from_env()
    os.environ.update(rdzv)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        logger.info("process group: backend=%s rank=%d/%d local_rank=%d", backend, rank, world_size, local_rank)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup_distributed() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
