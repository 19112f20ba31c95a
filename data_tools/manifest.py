"""The growing manifest: ``DATA_ROOT/manifest.json`` maps stages to shards (DESIGN.md "On disk").

Schema (version 1)::

    {
      "format": "growclip-manifest", "version": 1,
      "dedupe": {"method": "...", "unique": N},
      "stages": [
        {"stage": 1, "dir": "shards/stage_01", "count": N,
         "shards": [{"name": "shards/stage_01/000000.tar", "count": n, "sha256": "...", "bytes": b}],
         "hashes": "shards/stage_01/hashes.txt",
         "sources": [{"path": "...", "format": "table", "records": n, "input_sha256": "..."}],
         "options": {...ingest options: image size, resize mode, filters...},
         "image": {"size": 64, "format": "jpeg", "resize_mode": "border", "as_is": n, "reencoded": n},
         "drops": {"reason": n, ...}, "dedupe": {"within_stage": n, "across_stages": n},
         "repairs": [...]}
      ]
    }

Shard ``name`` entries are relative to DATA_ROOT. The manifest is only ever replaced atomically, and
ingest only appends stages that hold pairs; ``check_no_empty_stages`` refuses a manifest with an empty stage
(appended by an ingest before issue #14), which ``validate --repair`` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from data_tools.lock import exclusive_lock

__all__ = [
    "MANIFEST_NAME",
    "DEDUPE_METHOD",
    "load_manifest",
    "save_manifest",
    "empty_stages",
    "check_no_empty_stages",
    "stage_entry",
    "stage_image",
    "stage_dir_name",
    "sha256_file",
    "shard_paths",
    "writer_lock",
    "WRITER_LOCK",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DEDUPE_METHOD = "sha256 of the decoded RGB pixels (width, height, raw bytes) at original resolution"


def stage_dir_name(stage: int) -> str:
    """``shards/stage_NN`` relative to DATA_ROOT."""
    return f"shards/stage_{stage:02d}"


def empty_manifest() -> dict[str, Any]:
    """A manifest with no stages."""
    return {"format": "growclip-manifest", "version": 1, "dedupe": {"method": DEDUPE_METHOD, "unique": 0}, "stages": []}


def load_manifest(data_root: str | Path, *, missing_ok: bool = True) -> dict[str, Any]:
    """Read ``DATA_ROOT/manifest.json`` and check its structure.

    Args:
        data_root: the data root.
        missing_ok: return an empty manifest when the file does not exist.

    Raises:
        FileNotFoundError: no manifest and ``missing_ok`` is False.
        ValueError: the file is not valid JSON (e.g. truncated) or not a GrowCLIP manifest; the
            message names the file.
    """
    path = Path(data_root) / MANIFEST_NAME
    if not path.exists():
        if missing_ok:
            return empty_manifest()
        raise FileNotFoundError(
            f"{path} does not exist: build a corpus first with `python -m data_tools ingest ...` "
            "or `python -m data_tools build-offline DATA_ROOT`"
        )
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file; move it away (the manifest is a JSON file)")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({type(exc).__name__}: {exc}); data_tools only ever replaces it atomically, "
            "so it was truncated or edited by something else (a partial copy, a full disk during a copy): "
            "restore it from the copy it came from or a backup"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != "growclip-manifest":
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{path} is not a GrowCLIP manifest (format={fmt!r}); point at a data root built by data_tools"
        )
    problem = _structure_problem(obj)
    if problem:
        raise ValueError(f"{path}: {problem}; the manifest was edited by hand: restore it from a backup")
    return obj


def _structure_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a manifest (the fields every reader relies on), if anything."""
    stages = obj.get("stages")
    if not isinstance(stages, list):
        return f"'stages' is a {type(stages).__name__}, not a list"
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict):
            return f"stages[{i}] is a {type(entry).__name__}, not an object"
        for key, kind in (("stage", int), ("dir", str), ("count", int), ("shards", list)):
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                return f"stages[{i}].{key} is {entry.get(key)!r}, expected {kind.__name__}"
        for j, shard in enumerate(entry["shards"]):
            if not isinstance(shard, dict) or not all(isinstance(shard.get(k), t) for k, t in _SHARD_FIELDS):
                return f"stages[{i}].shards[{j}] lacks name/count/sha256"
    return None


_SHARD_FIELDS = (("name", str), ("count", int), ("sha256", str))


def save_manifest(data_root: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically replace ``DATA_ROOT/manifest.json``."""
    manifest["stages"] = sorted(manifest["stages"], key=lambda s: s["stage"])
    atomic_write_json(Path(data_root) / MANIFEST_NAME, manifest)


def empty_stages(manifest: dict[str, Any]) -> list[int]:
    """Stages that hold no pairs (``count`` 0): an ingest before issue #14 appended one on a re-run or
    when it dropped every pair, and ``validate --repair`` leaves one when every shard was lost."""
    return sorted(entry["stage"] for entry in manifest["stages"] if entry["count"] == 0)


def check_no_empty_stages(manifest: dict[str, Any], data_root: str | Path) -> None:
    """Refuse a manifest with an empty stage (jobs call this before planning or training).

    Raises:
        ValueError: one line naming the empty stages, the manifest, and the command that removes them.
    """
    empty = empty_stages(manifest)
    if empty:
        root = Path(data_root)
        names = ", ".join(map(str, empty))
        raise ValueError(
            f"stage{'s' if len(empty) > 1 else ''} {names} of the corpus hold{'' if len(empty) > 1 else 's'} no pairs "
            f"({root / MANIFEST_NAME}); remove the empty entries with `python -m data_tools validate {root} --repair` "
            f"(an empty stage holds no data, nothing is lost), then ingest stage {empty[0]} again "
            f"(`python -m data_tools ingest --stage {empty[0]} ...`) or lower data.stages"
        )


def stage_entry(manifest: dict[str, Any], stage: int) -> dict[str, Any] | None:
    """The manifest entry of ``stage`` or None."""
    for entry in manifest["stages"]:
        if entry["stage"] == stage:
            return entry
    return None


def stage_image(entry: dict[str, Any]) -> dict[str, Any]:
    """What the stage's shard images are: ``{"size", "format", "resize_mode"}``.

    ``size`` is the side of the square images (resize modes ``border`` and ``center_crop``) or their short side
    (``keep_ratio``); ``format`` is ``jpeg``. Stages ingested before the ``image`` field existed (issue #19) are read
    from their ``options``, which always held the size and mode.
    """
    image = entry.get("image")
    if isinstance(image, dict) and isinstance(image.get("size"), int):
        return {"size": image["size"], "format": image.get("format", "jpeg"), "resize_mode": image.get("resize_mode")}
    options = entry.get("options") or {}
    return {"size": options.get("image_size"), "format": "jpeg", "resize_mode": options.get("resize_mode")}


def shard_paths(
    data_root: str | Path, manifest: dict[str, Any], stages: list[int] | None = None
) -> dict[int, list[Path]]:
    """Absolute shard paths per stage (all stages when ``stages`` is None).

    Raises:
        ValueError: a requested stage is not in the manifest.
    """
    root = Path(data_root)
    have = {s["stage"]: s for s in manifest["stages"]}
    wanted = sorted(have) if stages is None else list(stages)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise ValueError(f"stages {missing} are not in {root / MANIFEST_NAME} (it has {sorted(have)})")
    return {s: [root / sh["name"] for sh in have[s]["shards"]] for s in wanted}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


WRITER_LOCK = ".lock"  # DATA_ROOT's writer lock


@contextlib.contextmanager
def writer_lock(data_root: str | Path, what: str) -> Iterator[None]:
    """Hold ``DATA_ROOT/.lock`` while writing (:func:`data_tools.lock.exclusive_lock`: one writer on any node).

    A lock left behind by a writer that died on this host is taken over; one left on another host is
    refused with the host and how to clear it.

    Args:
        data_root: the corpus (created if missing).
        what: the writer (``"ingest"``, ``"validate --repair"``): recorded in the lock, named in errors.

    Raises:
        LockError: (a RuntimeError) another ingest or repair holds it; the message names it.
    """
    root = Path(data_root)
    busy = f"{root} is being written by another ingest or repair; wait for it to finish before running {what}"
    with exclusive_lock(root / WRITER_LOCK, what, busy=busy):
        yield
