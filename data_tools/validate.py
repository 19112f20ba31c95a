"""``validate`` (and ``--repair``): check every shard against the manifest.

A shard is good when it exists, its sha256 and sample count match the manifest, and every sample
has a decodable ``.jpg`` whose bytes match the ``jpg_sha256`` recorded in its ``.json``, a UTF-8
``.txt`` and a JSON ``.json``. ``--repair`` copies a bad shard to ``DATA_ROOT/quarantine/`` (fsynced),
then atomically replaces it (temp name + rename) with a shard holding every sample that still passes
these per-sample checks (read with a tolerant tar scanner that skips damaged headers): at every
instant a shard exists under its name, so a crash mid-repair loses nothing. The stage's
``hashes.txt`` is rebuilt from the surviving samples (dropped samples no longer count as
duplicates; also when it is missing or holds a line that is not a pixel hash), then the manifest is
updated atomically. The dedupe index (``dedupe.sqlite``, a cache) notices the rewritten file by its
size, mtime and sha256 and reloads that stage the next time ingest opens it. A missing shard (or
one that is not a regular file) cannot be repaired; ``--repair`` removes it from the manifest,
records it under the stage's ``repairs`` and reports the lost count. A stage that holds no pairs
(an ingest before issue #14 appended one on a re-run) is a problem too; ``--repair`` removes its
entry (it holds no data) and its directory when that holds nothing but an empty ``hashes.txt``, so
``ingest --stage N`` can fill it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.atomic import atomic_write_json, fsync_dir
from data_tools.dedupe import pixel_hash_key, stage_hashes_path, write_hashes_file
from data_tools.ingest import shard_stats, write_tar
from data_tools.manifest import empty_stages, load_manifest, save_manifest, sha256_file, writer_lock

__all__ = ["ShardProblem", "ValidationReport", "validate", "read_samples_tolerant", "check_sample"]

logger = logging.getLogger(__name__)


@dataclass
class ShardProblem:
    """One bad shard."""

    shard: str
    problems: list[str]
    good: int = 0
    bad: int = 0
    action: str = ""


@dataclass
class ValidationReport:
    """Result of ``validate``: ``ok`` is True when every shard is (now) clean."""

    shards: int = 0
    samples: int = 0
    bad: list[ShardProblem] = field(default_factory=list)
    repaired: bool = False
    lost: int = 0
    empty_stages: list[int] = field(default_factory=list)  # stages holding no pairs (removed when repairing)

    @property
    def ok(self) -> bool:
        if self.repaired:  # clean now: every bad shard was re-packed or (missing) removed, empty stages removed
            return all(p.action for p in self.bad)
        return not self.bad and not self.empty_stages

    def render(self) -> str:
        problems = len(self.bad) + len(self.empty_stages)
        lines = [f"checked {self.shards} shards, {self.samples} samples: {'OK' if not problems else f'{problems} bad'}"]
        for p in self.bad:
            lines.append(f"  {p.shard}: {'; '.join(p.problems)}" + (f" -> {p.action}" if p.action else ""))
        for stage in self.empty_stages:
            fix = (
                f"entry removed; fill it again with `python -m data_tools ingest --stage {stage} ...` if needed"
                if self.repaired
                else "run `validate --repair` to remove the entry (it holds no data)"
            )
            lines.append(f"  stage {stage}: holds no pairs -> {fix}")
        if self.repaired and self.bad:
            lines.append(f"repair: {self.lost} samples lost" + (" (none)" if not self.lost else ""))
        return "\n".join(lines)


def read_samples_tolerant(data: bytes) -> tuple[dict[str, dict[str, bytes]], int]:
    """Group tar members by key, skipping damaged 512-byte header blocks.

    Returns:
        ``({key: {ext: bytes}}, damaged_blocks)`` in tar order.
    """
    samples: dict[str, dict[str, bytes]] = {}
    damaged = 0
    pos = 0
    while pos + 512 <= len(data):
        block = data[pos : pos + 512]
        if block == b"\0" * 512:
            pos += 512
            continue
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError:
            damaged += 1
            pos += 512
            continue
        start = pos + 512
        end = start + info.size
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
            pos = start + -(-info.size // 512) * 512  # metadata headers: skip their payload
            continue
        if end > len(data):
            damaged += 1
            break
        if info.isfile():
            key, _, ext = info.name.partition(".")
            samples.setdefault(key, {})[ext] = data[start:end]
        pos = start + -(-info.size // 512) * 512
    return samples, damaged


def check_sample(parts: dict[str, bytes]) -> str | None:
    """Return None when a sample is good, else what is wrong with it."""
    missing = [e for e in ("jpg", "txt", "json") if e not in parts]
    if missing:
        return f"missing {','.join(missing)}"
    try:
        meta = json.loads(parts["json"])
        parts["txt"].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        return f"bad json/txt: {exc}"
    if meta.get("jpg_sha256") and hashlib.sha256(parts["jpg"]).hexdigest() != meta["jpg_sha256"]:
        return "jpg bytes do not match jpg_sha256"
    try:
        with Image.open(io.BytesIO(parts["jpg"])) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        return f"jpg does not decode: {exc}"
    return None


def _check_shard(path: Path, expect: dict[str, Any]) -> tuple[list[str], list[dict[str, bytes | str]], int]:
    """Problems with one existing shard, its good samples (webdataset dicts) and its bad-sample count."""
    problems = []
    sha = sha256_file(path)
    if sha != expect["sha256"]:
        problems.append("sha256 mismatch")
    samples, damaged = read_samples_tolerant(path.read_bytes())
    if damaged:
        problems.append(f"{damaged} damaged tar blocks")
    good: list[dict[str, bytes | str]] = []
    bad = 0
    for key, parts in samples.items():
        why = check_sample(parts)
        if why is None:
            good.append({"__key__": key, "jpg": parts["jpg"], "txt": parts["txt"], "json": parts["json"]})
        else:
            bad += 1
            if bad <= 3:
                problems.append(f"sample {key}: {why}")
    if len(good) != expect["count"]:
        problems.append(f"{len(good)} good samples, manifest says {expect['count']}")
    return problems, good, bad


def _pixel_hash(sample: dict[str, bytes | str]) -> str | None:
    """The ``pixel_sha256`` recorded in a (checked) sample's json, if any."""
    try:
        value = json.loads(sample["json"]).get("pixel_sha256")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _quarantine_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` durably (temp name, fsync, rename, fsync of the directory)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copy2(src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _hashes_unusable(root: Path, stage: dict[str, Any]) -> bool:
    """Whether the stage's ``hashes.txt`` is missing or holds a line that is not a pixel hash (sha256 hex)."""
    path = stage_hashes_path(root, stage)
    if not path.is_file():
        return True
    with open(path, encoding="utf-8", errors="replace") as fh:
        return not all(_is_pixel_hash(line.strip()) for line in fh if line.strip())


def _is_pixel_hash(text: str) -> bool:
    return pixel_hash_key(text) is not None


def _rebuild_hashes(root: Path, stage: dict[str, Any], hashes: set[str]) -> int:
    """Rewrite the stage's ``hashes.txt`` (atomically) from its surviving samples; return how many left it."""
    path = stage_hashes_path(root, stage)
    lines = path.read_text(errors="replace").split() if path.is_file() else []
    old = {h for h in lines if _is_pixel_hash(h)}  # a damaged line was never a hash
    if not path.is_file() or len(lines) != len(old) or old != hashes:
        logger.info("rewriting %s from the stage's surviving samples", path)
        write_hashes_file(path, sorted(hashes))
    return len(old - hashes)


def validate(data_root: str | Path, *, repair: bool = False) -> ValidationReport:
    """Check (and optionally repair) every shard listed in ``DATA_ROOT/manifest.json``.

    Args:
        data_root: the corpus.
        repair: quarantine bad shards and re-pack their good samples.

    Returns:
        The report; ``report.ok`` decides the exit code.
    """
    root = Path(data_root)
    load_manifest(root, missing_ok=False)  # a clear error before taking the lock
    with writer_lock(root, "validate --repair") if repair else contextlib.nullcontext():
        return _validate(root, repair)


def _validate(root: Path, repair: bool) -> ValidationReport:
    """``validate`` body (with the writer lock held when repairing)."""
    manifest = load_manifest(root, missing_ok=False)
    report = ValidationReport(repaired=repair)
    changed = False
    for stage in manifest["stages"]:
        kept_shards = []
        stage_changed = False
        survivors: set[str] = set()  # pixel hashes of the samples the stage still holds
        for sh in stage["shards"]:
            report.shards += 1
            path = root / sh["name"]
            if not path.is_file():  # missing, or a FIFO/directory/device that must never be opened
                prob = ShardProblem(
                    sh["name"], ["missing" if not path.exists() else "not a regular file"], bad=sh["count"]
                )
                report.bad.append(prob)
                if repair:
                    prob.action = f"removed from manifest, {sh['count']} samples lost"
                    report.lost += sh["count"]
                    stage.setdefault("repairs", []).append(
                        {"shard": sh["name"], "action": "missing", "lost": sh["count"]}
                    )
                    stage["count"] -= sh["count"]
                    changed = stage_changed = True
                    continue
                kept_shards.append(sh)
                continue
            problems, good, bad = _check_shard(path, sh)
            report.samples += len(good)
            if repair:
                survivors.update(h for h in map(_pixel_hash, good) if h)
            if not problems:
                kept_shards.append(sh)
                continue
            prob = ShardProblem(sh["name"], problems, good=len(good), bad=bad)
            report.bad.append(prob)
            if not repair:
                kept_shards.append(sh)
                continue
            qdir = root / "quarantine" / Path(sh["name"]).parent.name
            qdir.mkdir(parents=True, exist_ok=True)
            qpath = qdir / path.name
            n = 1
            while qpath.exists():
                qpath = qdir / f"{path.stem}.{n}{path.suffix}"
                n += 1
            good.sort(key=lambda s: str(s["__key__"]))
            # copy (not move) to quarantine, then write_tar replaces the shard atomically (temp name +
            # rename): a shard exists under its name at every instant, so a crash here loses nothing
            _quarantine_copy(path, qpath)
            sha = write_tar(path, good)
            fsync_dir(path.parent)
            nbytes = path.stat().st_size
            atomic_write_json(path.with_name(path.stem + "_stats.json"), shard_stats(sh["name"], good, sha, nbytes))
            report.lost += max(0, sh["count"] - len(good))
            stage["count"] += len(good) - sh["count"]
            stage.setdefault("repairs", []).append(
                {"shard": sh["name"], "quarantined": str(qpath.relative_to(root)), "good": len(good), "dropped": bad}
            )
            kept_shards.append({**sh, "count": len(good), "sha256": sha, "bytes": nbytes})
            prob.action = f"repaired: {len(good)} good samples re-packed, original in {qpath.relative_to(root)}"
            changed = stage_changed = True
            logger.warning("repaired %s: %d good samples kept, %d bad dropped", sh["name"], len(good), bad)
        stage["shards"] = kept_shards
        # dropped samples must not count as duplicates of later stages; ingest's dedupe needs a readable file
        if repair and (stage_changed or _hashes_unusable(root, stage)):
            gone = _rebuild_hashes(root, stage, survivors)
            if gone and "dedupe" in manifest:
                manifest["dedupe"]["unique"] = max(0, manifest["dedupe"].get("unique", 0) - gone)
    report.empty_stages = empty_stages(manifest)
    empty_dirs = [s["dir"] for s in manifest["stages"] if s["stage"] in report.empty_stages]
    if repair and report.empty_stages:
        manifest["stages"] = [s for s in manifest["stages"] if s["stage"] not in report.empty_stages]
        changed = True
    if changed:
        save_manifest(root, manifest)
    if repair:
        for sdir in empty_dirs:
            _remove_empty_stage_dir(root / sdir)
    return report


def _remove_empty_stage_dir(sdir: Path) -> None:
    """Remove the directory of a removed empty stage if it holds nothing but an empty hashes.txt
    (so ``ingest --stage N`` may fill the number again); anything else in it is left where it is."""
    hashes = sdir / "hashes.txt"
    if hashes.is_file() and not hashes.read_text().strip():
        hashes.unlink()
    with contextlib.suppress(OSError):
        sdir.rmdir()
    if sdir.exists():
        logger.warning("%s still holds files; move them away before ingesting that stage again", sdir)
