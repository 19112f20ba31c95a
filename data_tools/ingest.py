"""``ingest``: crawled image-text pairs -> a NEW append-only stage of webdataset shards (STYLE.md R16).

Inputs (as users have them):
  * ``img2dataset`` output: its webdataset tars (``key.jpg/.txt/.json``) or its ``files`` layout
    (``00000/000000000.jpg`` + ``.txt`` + ``.json``);
  * ``table``: a CSV / JSONL / Parquet table with a caption column and a local image-path column
    (paths may be relative to the table file).

Output: ``shards/stage_NN/%06d.tar`` (``key.jpg``, ``key.txt``, ``key.json``), ``%06d_stats.json`` per
shard, ``shards/stage_NN/hashes.txt`` (pixel hashes for cross-stage dedupe), and the stage's entry in
``manifest.json``, written last and atomically.

Determinism: records are enumerated in sorted order and processed by an *ordered* worker pool, so
neither scheduling nor the worker count changes which pairs are kept, their keys, or the shard
boundaries; tar headers carry a fixed mtime/uid/gid/uname and sorted member names.

Resume: ``DATA_ROOT/.ingest/stage_NN/journal.json`` records every finished shard (name, sha256,
count, pixel hashes) and how many input records it consumed. A re-run with the same input and
options verifies those shards, skips the consumed records and completes the stage; the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import webdataset as wds

from data_tools.atomic import atomic_write_json, atomic_write_text
from data_tools.imaging import Dropped, ImageOptions, ProcessedPair, process_pair
from data_tools.manifest import (
    DEDUPE_METHOD,
    load_manifest,
    save_manifest,
    sha256_file,
    stage_dir_name,
    stage_entry,
    writer_lock,
)

__all__ = ["InputFormat", "Record", "IngestResult", "enumerate_records", "ingest", "read_stage_hashes", "write_tar"]

logger = logging.getLogger(__name__)

InputFormat = Literal["img2dataset", "table"]
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so that identical input gives identical shard bytes
TAR_USER = "growclip"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
JOURNAL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Record:
    """One input pair before processing; the image is read by the worker, never held here.

    The image is one of: ``image_path`` (a file: table and files layouts), ``image_member`` (a member
    of an uncompressed tar: ``(tar path, data offset, size)``, img2dataset tars) or ``image_bytes``
    (already in memory; only for compressed tars, which cannot be read at an offset).
    """

    source: str  # stable id relative to the input: "table.jsonl#12" or "00000/000000012"
    caption: bytes | str | None
    image_path: str | None = None  # read by the worker (table and files layouts)
    image_bytes: bytes | None = None  # already read (compressed tars only)
    url: str | None = None
    image_member: tuple[str, int, int] | None = None  # (tar path, offset of the data, size): read by the worker


@dataclass
class IngestResult:
    """What one ingest produced (also recorded in the manifest)."""

    stage: int
    count: int
    shards: list[dict[str, Any]]
    drops: dict[str, int]
    records: int


# ----------------------------------------------------------------------------------------- inputs
def _table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc}); fix or remove the line") from exc
        return rows
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RuntimeError(
                f"reading {path} needs pyarrow: `.venv/bin/pip install -c constraints.txt pyarrow`, "
                "or convert the table to CSV/JSONL"
            ) from exc
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown table type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")


def _table_records(path: Path, caption_col: str, image_col: str) -> list[Record]:
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise ValueError(f"{path}: no .csv/.tsv/.jsonl/.parquet table found")
    records = []
    for table in files:
        rows = _table_rows(table)
        if rows and (caption_col not in rows[0] or image_col not in rows[0]):
            raise ValueError(
                f"{table}: columns {sorted(rows[0])} lack caption column {caption_col!r} or image column "
                f"{image_col!r}; pass --caption-col/--image-col"
            )
        for i, row in enumerate(rows):
            img = row.get(image_col)
            img_path = None if not img else str(img if Path(str(img)).is_absolute() else table.parent / str(img))
            cap = row.get(caption_col)
            records.append(
                Record(f"{table.name}#{i}", None if cap is None else str(cap), image_path=img_path, url=row.get("url"))
            )
    return records


def _img2dataset_tar_records(tars: list[Path]) -> list[Record]:
    """Records of img2dataset tars from a headers-only pass: image members are referenced, not read.

    Captions and ``.json`` metadata (small) are read; an image is recorded as (tar, offset, size) and
    read by the worker, so memory does not grow with the size of the crawl.
    """
    records = []
    for tar_path in tars:
        groups: dict[str, dict[str, bytes | tuple[str, int, int]]] = {}
        try:
            tar_size = tar_path.stat().st_size
            lazy = _is_plain_tar(tar_path)  # uncompressed: members can be read at their offset later
            with tarfile.open(tar_path, "r:" if lazy else "r") as tf:
                if not lazy:
                    logger.warning("%s: compressed tar: its images are held in memory; prefer plain .tar", tar_path)
                while (member := tf.next()) is not None:
                    tf.members.clear()  # headers of members already seen are not needed: keep memory flat
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    key, _, ext = base.partition(".")
                    ext = "." + ext.lower()
                    value: bytes | tuple[str, int, int]
                    if lazy and ext in IMAGE_EXTS:
                        if member.offset_data + member.size > tar_size:
                            raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                        value = (str(tar_path), member.offset_data, member.size)
                    else:
                        fh = tf.extractfile(member)
                        value = fh.read() if fh else b""
                    groups.setdefault(os.path.join(os.path.dirname(member.name), key), {})[ext] = value
        except (tarfile.TarError, OSError) as exc:
            logger.warning("%s: unreadable tar (%s); pairs read before the error are kept", tar_path, exc)
        for key in sorted(groups):
            parts = groups[key]
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            txt, meta_raw = parts.get(".txt"), parts.get(".json")  # never lazy: read above
            meta = _json_or_none(meta_raw if isinstance(meta_raw, bytes) else None)
            records.append(
                Record(
                    f"{tar_path.name}/{key}",
                    txt if isinstance(txt, bytes) else None,
                    image_bytes=image if isinstance(image, bytes) else None,
                    image_member=image if isinstance(image, tuple) else None,
                    url=meta.get("url"),
                )
            )
    return records


def _is_plain_tar(path: Path) -> bool:
    """Whether ``path`` is an uncompressed tar (its members can be read at an offset)."""
    try:
        with tarfile.open(path, "r:"):
            return True
    except tarfile.ReadError:
        return False


def _read_member(ref: tuple[str, int, int]) -> bytes:
    """The bytes of a tar member recorded as (tar path, data offset, size)."""
    path, offset, size = ref
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at offset {offset} is truncated ({len(data)} of {size} bytes)")
    return data


def _json_or_none(raw: bytes | None) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _img2dataset_files_records(root: Path) -> list[Record]:
    stems: set[Path] = set()
    for p in root.rglob("*"):
        if p.is_file() and p.suffix.lower() in (*IMAGE_EXTS, ".txt") and not p.name.endswith("_stats.json"):
            stems.add(p.with_suffix(""))
    records = []
    for stem in sorted(stems):
        image = next((stem.with_suffix(e) for e in IMAGE_EXTS if stem.with_suffix(e).exists()), None)
        txt = stem.with_suffix(".txt")
        meta_path = stem.with_suffix(".json")
        meta = _json_or_none(meta_path.read_bytes()) if meta_path.exists() else {}
        records.append(
            Record(
                str(stem.relative_to(root)),
                txt.read_bytes() if txt.exists() else None,
                image_path=str(image) if image else str(stem) + ".jpg",
                url=meta.get("url"),
            )
        )
    return records


def enumerate_records(
    path: str | Path, fmt: InputFormat, *, caption_col: str = "caption", image_col: str = "image"
) -> list[Record]:
    """List an input's pairs in a deterministic (sorted) order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the input does not look like ``fmt``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if fmt == "table":
        return _table_records(path, caption_col, image_col)
    if fmt == "img2dataset":
        tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
        if tars:
            return _img2dataset_tar_records(tars)
        if path.is_dir():
            return _img2dataset_files_records(path)
        raise ValueError(f"{path}: not an img2dataset output (expected *.tar shards or a dir of 00000/*.jpg+.txt)")
    raise ValueError(f"--format {fmt!r}: use img2dataset or table")


# ---------------------------------------------------------------------------------------- workers
_WORKER_OPTS: ImageOptions | None = None


def _init_worker(opts: ImageOptions) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts


def _process_record(record: Record) -> ProcessedPair | Dropped:
    """Worker entry: read the image (if not in memory) and run every filter."""
    assert _WORKER_OPTS is not None
    data = record.image_bytes
    if data is None and record.image_member is not None:
        try:
            data = _read_member(record.image_member)
        except OSError as exc:
            return Dropped("read_error", str(exc))
    elif data is None and record.image_path is not None:
        try:
            data = Path(record.image_path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        except OSError as exc:
            return Dropped("read_error", str(exc))
    return process_pair(data, record.caption, _WORKER_OPTS)


def _results(records: list[Record], opts: ImageOptions, workers: int) -> Iterator[ProcessedPair | Dropped]:
    """Process records in input order (ordered imap: worker count never changes the output)."""
    if workers <= 1 or len(records) < 2:
        _init_worker(opts)
        yield from map(_process_record, records)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        yield from pool.imap(_process_record, records, chunksize=8)


# ----------------------------------------------------------------------------------------- shards
def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> str:
    """Write ``samples`` (dicts with ``__key__``) as a reproducible tar, atomically; return its sha256.

    The tar is written under a temporary name in the same directory, fsynced and renamed.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        with wds.TarWriter(fh, user=TAR_USER, group=TAR_USER, mtime=TAR_MTIME, encoder=False) as writer:
            for sample in samples:
                writer.write(
                    {k: (v.encode() if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()}
                )
        fh.flush()
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def _caption_summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": round(statistics.fmean(lengths), 3), "min": min(lengths), "max": max(lengths)}


def shard_stats(name: str, samples: list[dict[str, Any]], sha: str, nbytes: int) -> dict[str, Any]:
    """The ``%06d_stats.json`` payload of one shard."""
    words = [len(str(s["txt"]).split()) for s in samples]
    return {
        "shard": name,
        "count": len(samples),
        "sha256": sha,
        "bytes": nbytes,
        "caption_words": words,
        "caption_words_summary": _caption_summary(words),
        "caption_chars_summary": _caption_summary([len(str(s["txt"])) for s in samples]),
    }


def read_stage_hashes(data_root: Path, entry: dict[str, Any]) -> set[str]:
    """Pixel hashes of a finished stage (for cross-stage dedupe)."""
    path = data_root / entry.get("hashes", f"{entry['dir']}/hashes.txt")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: cross-stage dedupe needs it; run `python -m data_tools validate --repair`"
        )
    return set(path.read_text().split())


# ---------------------------------------------------------------------------------------- journal
def _journal_path(data_root: Path, stage: int) -> Path:
    return data_root / ".ingest" / f"stage_{stage:02d}" / "journal.json"


def _fingerprint(records: list[Record], fmt: str, opts: ImageOptions, shard_size: int) -> str:
    h = hashlib.sha256(json.dumps([fmt, dataclasses.asdict(opts), shard_size], sort_keys=True).encode())
    for r in records:
        h.update(r.source.encode() + b"\0")
        if r.image_member is not None:  # lazy tar member: where it is and how big (its bytes are not read here)
            h.update(f"{r.image_member[1]}:{r.image_member[2]}\0".encode())
    return h.hexdigest()


def _pending_stage(data_root: Path, manifest: dict[str, Any]) -> int | None:
    done = {s["stage"] for s in manifest["stages"]}
    pending = sorted(
        int(p.name.split("_")[1]) for p in (data_root / ".ingest").glob("stage_*") if (p / "journal.json").exists()
    )
    pending = [s for s in pending if s not in done]
    return pending[0] if pending else None


class _Progress:
    """tqdm on a TTY, otherwise a log line every ``every_s`` seconds."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float = 10.0) -> None:
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self.bar = None
        self.last = time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="pair")

    def update(self, kept: int) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            logger.info("%s: %d/%d pairs read, %d kept", self.desc, self.n, self.total, kept)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------- ingest
def ingest(
    input_path: str | Path,
    fmt: InputFormat,
    data_root: str | Path,
    *,
    stage: int | None = None,
    opts: ImageOptions | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    caption_col: str = "caption",
    image_col: str = "image",
    source_name: str | None = None,
) -> IngestResult:
    """Append a new stage built from ``input_path`` to ``data_root`` (or complete an interrupted one).

    Args:
        input_path: img2dataset output or a table (see module docstring).
        fmt: ``"img2dataset"`` or ``"table"``.
        data_root: the growing corpus.
        stage: stage number; default: an interrupted stage if one is pending, else last stage + 1.
        opts: image options and filters.
        shard_size: samples per shard.
        workers: decode/resize worker processes (does not change the output).
        caption_col: table caption column.
        image_col: table image-path column.
        source_name: name recorded in the manifest (default: the input path).

    Returns:
        The stage summary.

    Raises:
        FileNotFoundError: ``input_path`` does not exist (checked before DATA_ROOT is touched).
        ValueError: the stage already exists (stages are append-only) or a resume does not match.
    """
    if not Path(input_path).exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    with writer_lock(data_root, "ingest"):
        return _ingest_locked(
            input_path,
            fmt,
            Path(data_root),
            stage=stage,
            opts=opts or ImageOptions(),
            shard_size=shard_size,
            workers=workers,
            caption_col=caption_col,
            image_col=image_col,
            source_name=source_name,
        )


def _ingest_locked(
    input_path: str | Path,
    fmt: InputFormat,
    root: Path,
    *,
    stage: int | None,
    opts: ImageOptions,
    shard_size: int,
    workers: int,
    caption_col: str,
    image_col: str,
    source_name: str | None,
) -> IngestResult:
    """``ingest`` with ``DATA_ROOT/.lock`` held."""
    manifest = load_manifest(root)
    existing = [s["stage"] for s in manifest["stages"]]
    if stage is None:
        stage = _pending_stage(root, manifest) or (max(existing, default=0) + 1)
    if stage < 1:
        raise ValueError(f"--stage {stage}: stages are numbered from 1")
    if stage in existing:
        raise ValueError(
            f"stage {stage} already exists in {root / 'manifest.json'}: stages are append-only; "
            f"omit --stage to append stage {max(existing) + 1}"
        )
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be >= 1")

    records = enumerate_records(input_path, fmt, caption_col=caption_col, image_col=image_col)
    fingerprint = _fingerprint(records, fmt, opts, shard_size)
    sdir = root / stage_dir_name(stage)
    journal_path = _journal_path(root, stage)
    journal: dict[str, Any] = {
        "version": JOURNAL_VERSION,
        "fingerprint": fingerprint,
        "shards": [],
        "consumed": 0,
        "drops": {},
    }
    if journal_path.exists():
        old = json.loads(journal_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{journal_path}: an interrupted ingest of stage {stage} used a different input or options; "
                f"re-run it with the same arguments, or delete {journal_path.parent} and {sdir} to start over"
            )
        for sh in old["shards"]:
            if not (root / sh["name"]).exists() or sha256_file(root / sh["name"]) != sh["sha256"]:
                raise ValueError(
                    f"{root / sh['name']} changed since the interrupted ingest; delete {journal_path.parent} and {sdir}"
                )
        journal = old
        logger.info(
            "stage %d: resuming after %d finished shards (%d records consumed)",
            stage,
            len(old["shards"]),
            old["consumed"],
        )
    elif sdir.exists() and any(sdir.iterdir()):
        raise ValueError(
            f"{sdir} exists but stage {stage} is neither in the manifest nor journaled; move it away first"
        )
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(journal_path, journal)  # from now on the stage is pending: a re-run resumes it
    for tmp in sdir.glob(".*.tmp"):  # leftovers of a crash mid-write
        tmp.unlink()

    seen_before: set[str] = set()
    for entry in manifest["stages"]:
        if entry["stage"] != stage:
            seen_before |= read_stage_hashes(root, entry)
    seen_stage: set[str] = {h for sh in journal["shards"] for h in sh["hashes"]}
    drops: Counter[str] = Counter(journal["drops"])
    kept = sum(sh["count"] for sh in journal["shards"])
    consumed = journal["consumed"]
    pending: list[dict[str, Any]] = []
    pending_hashes: list[str] = []
    examples: dict[str, str] = {}

    def flush(consumed_upto: int) -> None:
        idx = len(journal["shards"])
        name = f"{stage_dir_name(stage)}/{idx:06d}.tar"
        sha = _write_shard(root / name, pending)
        nbytes = (root / name).stat().st_size
        atomic_write_json(root / name.replace(".tar", "_stats.json"), shard_stats(name, pending, sha, nbytes))
        journal["shards"].append(
            {"name": name, "count": len(pending), "sha256": sha, "bytes": nbytes, "hashes": list(pending_hashes)}
        )
        journal["consumed"] = consumed_upto
        journal["drops"] = dict(sorted(drops.items()))
        atomic_write_json(journal_path, journal)
        logger.info("stage %d: wrote %s (%d samples)", stage, name, len(pending))
        pending.clear()
        pending_hashes.clear()

    progress = _Progress(len(records), consumed, f"ingest stage {stage}")
    try:
        for i, result in enumerate(_results(records[consumed:], opts, workers), start=consumed):
            record = records[i]
            if isinstance(result, Dropped):
                drops[result.reason] += 1
                examples.setdefault(result.reason, f"{record.source}: {result.detail}".rstrip(": "))
            elif result.pixel_sha256 in seen_before:
                drops["duplicate_across_stages"] += 1
            elif result.pixel_sha256 in seen_stage:
                drops["duplicate_in_stage"] += 1
            else:
                seen_stage.add(result.pixel_sha256)
                key = f"s{stage:02d}_{kept:08d}"
                kept += 1
                meta = {
                    "key": key,
                    "stage": stage,
                    "source": record.source,
                    "url": record.url,
                    "orig_width": result.orig_width,
                    "orig_height": result.orig_height,
                    "pixel_sha256": result.pixel_sha256,
                    "jpg_sha256": result.jpg_sha256,
                }
                pending.append(
                    {"__key__": key, "jpg": result.jpg, "txt": result.caption, "json": json.dumps(meta, sort_keys=True)}
                )
                pending_hashes.append(result.pixel_sha256)
                if len(pending) >= shard_size:
                    flush(i + 1)
            progress.update(kept)
        if pending:
            flush(len(records))
    finally:
        progress.close()

    for reason, example in sorted(examples.items()):
        logger.info("stage %d: dropped %d pairs: %s (e.g. %s)", stage, drops[reason], reason, example)
    all_hashes = sorted(h for sh in journal["shards"] for h in sh["hashes"])
    atomic_write_text(sdir / "hashes.txt", "".join(h + "\n" for h in all_hashes))
    shards = [{k: v for k, v in sh.items() if k != "hashes"} for sh in journal["shards"]]
    entry = {
        "stage": stage,
        "dir": stage_dir_name(stage),
        "count": kept,
        "shards": shards,
        "hashes": f"{stage_dir_name(stage)}/hashes.txt",
        "sources": [{"path": source_name or str(input_path), "format": fmt, "records": len(records)}],
        "options": {**dataclasses.asdict(opts), "shard_size": shard_size},
        "drops": dict(sorted(drops.items())),
        "dedupe": {
            "method": DEDUPE_METHOD,
            "within_stage": drops.get("duplicate_in_stage", 0),
            "across_stages": drops.get("duplicate_across_stages", 0),
        },
    }
    manifest = load_manifest(root)  # re-read: never clobber a concurrent repair of another stage
    if stage_entry(manifest, stage) is not None:
        raise ValueError(f"stage {stage} appeared in the manifest while ingesting; stages are append-only")
    manifest["stages"].append(entry)
    manifest["dedupe"] = {"method": DEDUPE_METHOD, "unique": len(seen_before) + len(all_hashes)}
    save_manifest(root, manifest)  # the manifest entry is written last: the stage now exists
    shutil.rmtree(journal_path.parent, ignore_errors=True)
    with contextlib.suppress(OSError):  # only if no other stage is pending
        journal_path.parent.parent.rmdir()
    logger.info(
        "stage %d: %d pairs kept of %d in %d shards; drops %s", stage, kept, len(records), len(shards), dict(drops)
    )
    return IngestResult(stage, kept, shards, dict(drops), len(records))


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    """Write one shard (a separate function so tests can simulate a crash between shards)."""
    return write_tar(path, samples)
