"""``validate`` (and ``--repair``): check every shard against the manifest.

A shard is good when it exists, its sha256 and sample count match the manifest, and every sample
has a decodable ``.jpg`` whose bytes match the ``jpg_sha256`` recorded in its ``.json``, a UTF-8
``.txt`` and a JSON ``.json``. ``--repair`` moves a bad shard to ``DATA_ROOT/quarantine/`` and writes
a replacement with the same name holding every sample that still passes these per-sample checks
(read with a tolerant tar scanner that skips damaged headers), then updates the manifest
atomically. A missing shard cannot be repaired; ``--repair`` removes it from the manifest, records
it under the stage's ``repairs`` and reports the lost count.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.atomic import atomic_write_json
from data_tools.ingest import shard_stats, write_tar
from data_tools.manifest import load_manifest, save_manifest, sha256_file, writer_lock

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

    @property
    def ok(self) -> bool:
        if self.repaired:  # clean now: every bad shard was re-packed or (missing) removed
            return all(p.action for p in self.bad)
        return not self.bad

    def render(self) -> str:
        lines = [
            f"checked {self.shards} shards, {self.samples} samples: {'OK' if not self.bad else f'{len(self.bad)} bad'}"
        ]
        for p in self.bad:
            lines.append(f"  {p.shard}: {'; '.join(p.problems)}" + (f" -> {p.action}" if p.action else ""))
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
        for sh in stage["shards"]:
            report.shards += 1
            path = root / sh["name"]
            if not path.exists():
                prob = ShardProblem(sh["name"], ["missing"], bad=sh["count"])
                report.bad.append(prob)
                if repair:
                    prob.action = f"removed from manifest, {sh['count']} samples lost"
                    report.lost += sh["count"]
                    stage.setdefault("repairs", []).append(
                        {"shard": sh["name"], "action": "missing", "lost": sh["count"]}
                    )
                    stage["count"] -= sh["count"]
                    changed = True
                    continue
                kept_shards.append(sh)
                continue
            problems, good, bad = _check_shard(path, sh)
            report.samples += len(good)
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
            # write the replacement under a temp name first, then swap: a crash leaves the old shard in place
            tmp_new = path.with_name(path.name + ".repair")
            sha = write_tar(tmp_new, good)
            shutil.move(str(path), qpath)
            tmp_new.replace(path)
            nbytes = path.stat().st_size
            atomic_write_json(path.with_name(path.stem + "_stats.json"), shard_stats(sh["name"], good, sha, nbytes))
            report.lost += max(0, sh["count"] - len(good))
            stage["count"] += len(good) - sh["count"]
            stage.setdefault("repairs", []).append(
                {"shard": sh["name"], "quarantined": str(qpath.relative_to(root)), "good": len(good), "dropped": bad}
            )
            kept_shards.append({**sh, "count": len(good), "sha256": sha, "bytes": nbytes})
            prob.action = f"repaired: {len(good)} good samples re-packed, original in {qpath.relative_to(root)}"
            changed = True
            logger.warning("repaired %s: %d good samples kept, %d bad dropped", sh["name"], len(good), bad)
        stage["shards"] = kept_shards
    if changed:
        save_manifest(root, manifest)
    return report
