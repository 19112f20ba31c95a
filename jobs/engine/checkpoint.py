"""Checkpoint IO: atomic, checksummed, last-K-kept, resume from the newest that verifies (R14).

Layout (DESIGN.md "On disk")::

    RUN_DIR/stage_NN/train/checkpoints/step_00000100.pt         torch.save of a plain dict
    RUN_DIR/stage_NN/train/checkpoints/step_00000100.pt.sha256  "<hex>  step_00000100.pt"
    RUN_DIR/stage_NN/train/final.pt (+ final.pt.sha256)

Both files are written through ``data_tools.atomic`` (temp name in the same directory, fsync,
``os.replace``), the ``.pt`` first: a sidecar therefore always describes a complete file, and a
checkpoint without its sidecar (crash between the two renames) counts as unverified. A process
killed mid-write leaves a torn temp file (``.step_00000100.pt.XXXX.tmp``) that no reader ever
opens; the next save of that name and every prune delete such leftovers. A full disk (ENOSPC,
EDQUOT) fails the save with a :class:`CheckpointError` naming the path, the free space and the fix;
the temp file is removed and the previous checkpoints are untouched. The payload is
plain data (tensors, dicts, lists, numbers, strings), loaded with ``torch.load(weights_only=True)``:
no pickled objects or namespaces. This module stores any such dict; what a GrowCLIP checkpoint holds
is :meth:`jobs.engine.train_state.TrainState.state_dict` (jobs/README.md "Checkpoint format").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from data_tools.atomic import atomic_open, atomic_write_text, free_space

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_resume",
    "interrupted_first_save",
    "prune_checkpoints",
    "checkpoint_name",
]

logger = logging.getLogger(__name__)

FORMAT = "growclip-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, fails its checksum or is not a GrowCLIP checkpoint."""


class _HashingWriter:
    """File wrapper that feeds every written byte into a sha256 (one pass, no copy of the payload)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.hash, self.size = fh, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch's zip writer may turn it into "unexpected pos": kept for the message

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = exc
            raise


def checkpoint_name(step: int) -> str:
    """``step_00000100.pt``: zero-padded so names sort by step."""
    return f"step_{step:08d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _remove_stale_temps(directory: Path, pattern: str) -> None:
    """Delete temp files of killed writers (``atomic_open``'s ``.NAME.XXXX.tmp``) matching ``pattern``.

    Only called by the one process that writes checkpoints into ``directory`` (rank 0 of the stage's
    training), at a moment when it is not writing one, so no live write is touched.
    """
    for p in directory.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            logger.info("removed the torn temp file of an interrupted checkpoint write: %s", p)


def _disk_full(path: Path, exc: OSError, written: int | None) -> CheckpointError:
    free = free_space(path.parent)
    previous = [p for _, p in list_checkpoints(path.parent) if p != path]
    if previous:  # the last complete checkpoint says how much room one needs
        need = f"; a checkpoint needs about {previous[-1].stat().st_size / 2**20:.1f} MiB"
    elif written:
        need = f"; {written / 2**20:.1f} MiB had been written when the disk filled"
    else:
        need = ""
    return CheckpointError(
        f"disk full ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {os.strerror(exc.errno or 0)}) while writing "
        f"checkpoint {path} ({free} on that filesystem{need}); the previous checkpoints are intact. Free space "
        f"there (or lower train.keep_checkpoints, or use a --run-dir on a filesystem with room), then re-run the "
        f"same command to resume"
    )


def save_checkpoint(payload: dict[str, Any], path: Path) -> str:
    """Write ``payload`` atomically to ``path`` and its sha256 sidecar; return the hex digest.

    Raises:
        CheckpointError: the disk is full (or over quota): the message names the path, the free space
            and the fix; nothing half-written is left (a ``.pt`` whose sidecar cannot be written is removed).
    """
    path = Path(path)
    if path.parent.is_dir():
        _remove_stale_temps(path.parent, f".{path.name}.*.tmp")  # the .pt's and its sidecar's
    writer: _HashingWriter | None = None
    try:
        with atomic_open(path, "wb") as fh:
            writer = _HashingWriter(fh)
            torch.save(payload, writer)
    except Exception as exc:  # an OSError, or torch's RuntimeError around the one the writer saw
        seen = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, seen, writer.size if writer else None) from exc
        raise
    digest = writer.hash.hexdigest()
    try:
        atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")
    except OSError as exc:
        path.unlink(missing_ok=True)  # a .pt without its sidecar could never be verified
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, exc, writer.size) from exc
        raise
    return digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Check that ``path`` exists and matches its sidecar checksum.

    Raises:
        CheckpointError: missing file, missing/garbled sidecar, or a checksum mismatch.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    side = _sidecar(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: checksum file {side.name} is missing (write interrupted?)")
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    actual = _file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}… does not match {side.name} ({expected[:12]}…)")


def load_checkpoint(path: Path, *, verify: bool = True, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify (optionally) and load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: verification or unpickling failed, or the file is not a GrowCLIP checkpoint.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, disallowed types: all mean "unusable"
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} file (format={found!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} != supported {VERSION}")
    return payload


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_NNNNNNNN.pt`` in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(
    ckpt_dir: Path, loader: Callable[[Path], dict[str, Any]] = load_checkpoint
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``ckpt_dir`` that loads and verifies, with its payload.

    A newer checkpoint that fails is skipped with a WARNING naming it and the reason, and the
    previous one is tried. Returns None when there is no usable checkpoint.
    """
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, loader(path)
        except CheckpointError as exc:
            logger.warning("checkpoint step %d is unusable, falling back to the previous one: %s", step, exc)
    return None


def interrupted_first_save(ckpt_dir: Path) -> Path | None:
    """The checkpoint of ``ckpt_dir`` if it is the only one and lacks its sidecar, else None.

    That is the state a process killed between the first save's ``.pt`` rename and its sidecar leaves:
    nothing was ever verified in this directory, so the run starts from scratch (and overwrites that
    file at the same step), exactly as if the kill had come a moment earlier. Any other set of
    unusable checkpoints (a checksum that fails, several files) is damage to finished work and
    stays an error for a person to look at.
    """
    found = list_checkpoints(ckpt_dir)
    if len(found) == 1 and not _sidecar(found[0][1]).exists():
        return found[0][1]
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (and their sidecars; ``keep=0``: all); return what went."""
    if Path(ckpt_dir).is_dir():
        _remove_stale_temps(Path(ckpt_dir), ".step_*.pt.*.tmp")  # the .pt's and the sidecars' temps
    found = list_checkpoints(ckpt_dir)
    gone = []
    for _, path in found[: max(len(found) - keep, 0)]:
        for p in (path, _sidecar(path)):
            p.unlink(missing_ok=True)
        gone.append(path)
    return gone
