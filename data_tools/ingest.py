"""``ingest``: crawled image-text pairs -> a NEW append-only stage of webdataset shards (STYLE.md R16).

Inputs (as users have them; read by ``data_tools/inputs/``):
  * ``img2dataset`` output: its webdataset tars (``key.jpg/.txt/.json``) or its ``files`` layout
    (``00000/000000000.jpg`` + ``.txt`` + ``.json``);
  * ``table``: a CSV / JSONL / Parquet table with a caption column and a local image-path column
    (paths may be relative to the table file).

Output: ``shards/stage_NN/%06d.tar`` (``key.jpg``, ``key.txt``, ``key.json``), ``%06d_stats.json`` per
shard, ``shards/stage_NN/hashes.txt`` (pixel hashes for cross-stage dedupe), and the stage's entry in
``manifest.json``, written last and atomically.

Every input row is either kept or counted under a drop reason; no row can stop, hang or abort an
ingest. Problems with the input as a whole raise before anything is written. The manifest only
gains non-empty stages: a run that keeps no pair raises ``IngestFailed`` and leaves no trace, and a
re-run of an input already ingested (same ``input_sha256`` and options) is a no-op naming its stage.

Determinism: records are enumerated in sorted order and processed by an *ordered* worker pool, so
neither scheduling nor the worker count changes which pairs are kept, their keys, or the shard
boundaries; tar headers carry a fixed mtime/uid/gid/uname and sorted member names.

Resume: ``DATA_ROOT/.ingest/stage_NN/journal.json`` records every finished shard (name, sha256,
count) and how many input records it consumed; the shard's pixel hashes are in the dedupe index
(``DATA_ROOT/dedupe.sqlite``, :mod:`data_tools.dedupe`), committed after the tar and before the
journal names it. A re-run with the same input and options verifies those shards, skips the
consumed records and completes the stage; the result is byte-identical to an uninterrupted run.

Dedupe: every stage's pixel hashes are looked up in the on-disk index, a batch at a time, so RAM
does not grow with the corpus; ``hashes.txt`` is streamed from it in sorted order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from data_tools.atomic import atomic_write_json
from data_tools.dedupe import DedupeIndex, IndexDamaged, StageDedupe, write_hashes_file
from data_tools.imaging import Dropped, ImageOptions, ProcessedPair, process_pair, process_registered
from data_tools.inputs import InputFormat, Record, enumerate_records, read_record_image, record_digest, resolve_format
from data_tools.manifest import (
    DEDUPE_METHOD,
    MANIFEST_NAME,
    load_manifest,
    save_manifest,
    sha256_file,
    stage_dir_name,
    stage_entry,
    writer_lock,
)

__all__ = [
    "InputFormat",
    "Record",
    "IngestResult",
    "IngestFailed",
    "enumerate_records",
    "ingest",
    "write_tar",
]

logger = logging.getLogger(__name__)

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so that identical input gives identical shard bytes
TAR_USER = "growclip"
JOURNAL_VERSION = 3  # 2: the fingerprint covers the input's content (input_sha256); 3: hashes in dedupe.sqlite
LOOKUP_BATCH = 512  # pairs whose hashes are looked up in the dedupe index at once


@dataclass
class IngestResult:
    """What one ingest produced (also recorded in the manifest)."""

    stage: int
    count: int
    shards: list[dict[str, Any]]
    drops: dict[str, int]
    records: int
    input_sha256: str = ""
    already_ingested: bool = False  # the input was ingested before as ``stage``: nothing was written


class IngestFailed(RuntimeError):
    """The ingest ran but keeps no pair (exit code 1): nothing was appended, no journal is left."""


# ---------------------------------------------------------------------------------------- workers
_WORKER_OPTS: ImageOptions | None = None


def _init_worker(opts: ImageOptions) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts


def _init_pool_worker(opts: ImageOptions) -> None:
    """A pool worker: SIGTERM ends it quietly (the pool's own shutdown), whatever handler its parent forked with."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(opts)


def _process_record(record: Record) -> ProcessedPair | Dropped:
    """Worker entry: read the image (if not in memory) and run every filter."""
    assert _WORKER_OPTS is not None
    if record.drop is not None:
        return Dropped(*record.drop)
    data = read_record_image(record, _WORKER_OPTS.max_file_bytes)
    if isinstance(data, Dropped):
        return data
    if record.origin is not None and data:
        registered = process_registered(data, record.caption, record.origin, _WORKER_OPTS)
        if registered is not None:
            return registered
    return process_pair(data, record.caption, _WORKER_OPTS)


def _digest_record(record: Record) -> bytes:
    """Worker entry: the record's share of ``input_sha256``."""
    assert _WORKER_OPTS is not None
    return record_digest(record, _WORKER_OPTS.max_file_bytes)


# an ordered map over records: ``imap(_process_record, records)``
RecordMap = Callable[[Callable[[Record], Any], list[Record]], Iterable[Any]]


@contextlib.contextmanager
def _worker_map(opts: ImageOptions, workers: int) -> Iterator[RecordMap]:
    """An ordered ``map`` over records on ``workers`` processes (the worker count never changes the output)."""
    if workers <= 1:
        _init_worker(opts)
        yield map
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(opts,)) as pool:
        yield lambda fn, records: pool.imap(fn, records, chunksize=8)


def _input_sha256(records: list[Record], fmt: str, imap: RecordMap) -> str:
    """sha256 over the input's content in record order (ids, captions, urls, image bytes), streamed."""
    h = hashlib.sha256(f"growclip-input-v1\0{fmt}\0{len(records)}\0".encode())
    for digest in imap(_digest_record, records):
        h.update(digest)
    return h.hexdigest()


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


def shard_pixel_hashes(path: Path) -> Iterator[str]:
    """The ``pixel_sha256`` of every sample of a shard, from its ``key.json`` members (streamed)."""
    with tarfile.open(path) as tf:
        for member in tf:
            if member.name.endswith(".json"):
                fh = tf.extractfile(member)
                assert fh is not None, member.name
                yield json.loads(fh.read())["pixel_sha256"]


def _prefetched(results: Iterable[ProcessedPair | Dropped], dedupe: StageDedupe) -> Iterator[ProcessedPair | Dropped]:
    """``results`` unchanged, with each batch's pixel hashes looked up in the index before the batch is classified."""
    batch: list[ProcessedPair | Dropped] = []
    for result in results:
        batch.append(result)
        if len(batch) >= LOOKUP_BATCH:
            dedupe.prefetch([r.pixel_sha256 for r in batch if not isinstance(r, Dropped)])
            yield from batch
            batch = []
    dedupe.prefetch([r.pixel_sha256 for r in batch if not isinstance(r, Dropped)])
    yield from batch


# ---------------------------------------------------------------------------------------- journal
def _journal_path(data_root: Path, stage: int) -> Path:
    return data_root / ".ingest" / f"stage_{stage:02d}" / "journal.json"


def _fingerprint(fmt: str, options: dict[str, Any], input_sha256: str) -> str:
    """What a resume must match: the format, the options (incl. shard size) and the input's content."""
    return hashlib.sha256(json.dumps([fmt, options, input_sha256], sort_keys=True).encode()).hexdigest()


def _stage_options(opts: ImageOptions, shard_size: int) -> dict[str, Any]:
    """The stage's ``options`` exactly as the manifest holds them (JSON types: tuples become lists)."""
    return json.loads(json.dumps({**dataclasses.asdict(opts), "shard_size": shard_size}))


# options added after stages were ingested without them, at the value those stages had (an older stage holding the same
# input with the same options is still recognised)
_OPTION_DEFAULTS = {"reencode": True}


def _ingested_as(manifest: dict[str, Any], input_sha256: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The stage entry that already holds this input with these options, if any."""
    for entry in manifest["stages"]:
        same_input = any(src.get("input_sha256") == input_sha256 for src in entry.get("sources", []))
        if same_input and {**_OPTION_DEFAULTS, **entry.get("options", {})} == options:
            return entry
    return None


def _drop_summary(drops: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])))


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
    separator: str = "auto",
    path_base: str | os.PathLike[str] = "table",
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
        image_col: table image column (paths, or image bytes in a binary parquet column).
        source_name: name recorded in the manifest (default: the input path).
        separator: CSV/TSV field separator, ``"auto"`` (sniffed from the header) by default.
        path_base: relative image paths of a table resolve against ``"table"`` (its folder, the default),
            ``"cwd"`` (as open_clip) or a directory. Both change the records, hence ``input_sha256``.

    Returns:
        The stage summary; ``already_ingested`` is True (and nothing was written) when a stage already
        holds this input (same ``input_sha256``) with the same options.

    Raises:
        FileNotFoundError: ``input_path`` does not exist (checked before DATA_ROOT is touched).
        ValueError: the input is unusable as a whole, the stage already exists (stages are
            append-only) or a resume does not match; raised before anything is written.
        IngestFailed: no pair is kept (none in the input, or every one dropped); nothing is written.
    """
    if not Path(input_path).exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    if Path(data_root).exists() and not Path(data_root).is_dir():
        raise ValueError(f"--data-root {data_root} is not a directory; point it at the corpus directory")
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
            separator=separator,
            path_base=path_base,
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
    separator: str = "auto",
    path_base: str | os.PathLike[str] = "table",
) -> IngestResult:
    """``ingest`` with ``DATA_ROOT/.lock`` held."""
    manifest = load_manifest(root)
    existing = [s["stage"] for s in manifest["stages"]]
    if stage is None:
        stage = _pending_stage(root, manifest) or (max(existing, default=0) + 1)
    if stage < 1:
        raise ValueError(f"--stage {stage}: stages are numbered from 1")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be >= 1")

    fmt = resolve_format(input_path, fmt)  # auto/webdataset -> the reader: recorded in the manifest and input_sha256
    records = enumerate_records(
        input_path, fmt, caption_col=caption_col, image_col=image_col, opts=opts,
        separator=separator, path_base=path_base,
    )  # fmt: skip
    if not records:
        raise IngestFailed(
            f"the input has no pairs ({input_path}); nothing was written: point --input at a non-empty "
            f"{'table' if fmt == 'table' else 'img2dataset output'}"
        )
    options = _stage_options(opts, shard_size)
    with _worker_map(opts, workers if len(records) >= 2 else 1) as imap, contextlib.ExitStack() as cleanup:
        input_sha256 = _input_sha256(records, fmt, imap)
        done = _ingested_as(manifest, input_sha256, options)
        if done is not None:  # a retried or requeued job: the stage exists, nothing to do
            logger.info("already ingested as stage %d (input sha256 %s); nothing to do", done["stage"], input_sha256)
            src = next(s for s in done["sources"] if s.get("input_sha256") == input_sha256)
            return IngestResult(
                done["stage"], done["count"], done["shards"], dict(done.get("drops", {})),
                int(src.get("records", len(records))), input_sha256, already_ingested=True,
            )  # fmt: skip
        if stage in existing:
            raise ValueError(
                f"stage {stage} already exists in {root / MANIFEST_NAME}: stages are append-only; "
                f"omit --stage to append stage {max(existing) + 1}"
            )
        return _ingest_stage(
            input_path, fmt, root, manifest, records, imap, stage=stage, options=options,
            input_sha256=input_sha256, source_name=source_name, cleanup=cleanup,
        )  # fmt: skip


def _ingest_stage(
    input_path: str | Path,
    fmt: InputFormat,
    root: Path,
    manifest: dict[str, Any],
    records: list[Record],
    imap: RecordMap,
    *,
    stage: int,
    options: dict[str, Any],
    input_sha256: str,
    source_name: str | None,
    cleanup: contextlib.ExitStack,
) -> IngestResult:
    """Process ``records`` into stage ``stage`` (journaled, resumable) and append its manifest entry.

    The dedupe index is opened into ``cleanup`` (closed when the caller's ``with`` ends, whatever happens).
    """
    shard_size = options["shard_size"]
    fingerprint = _fingerprint(fmt, options, input_sha256)
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
        try:
            old = json.loads(journal_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{journal_path} is not valid JSON ({exc}); delete {journal_path.parent} and {sdir} to start "
                f"stage {stage} over"
            ) from None
        if isinstance(old, dict) and old.get("version") != JOURNAL_VERSION:
            raise ValueError(
                f"{journal_path}: an interrupted ingest of stage {stage} was journaled by an older version (journal "
                f"version {old.get('version')}, this one writes {JOURNAL_VERSION}) and cannot be resumed; delete "
                f"{journal_path.parent} and {sdir}, then run the same ingest again"
            )
        if not isinstance(old, dict) or old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{journal_path}: an interrupted ingest of stage {stage} used a different input or options; "
                f"re-run it with the same arguments, or delete {journal_path.parent} and {sdir} to start over"
            )
        for sh in old["shards"]:
            if not (root / sh["name"]).is_file() or sha256_file(root / sh["name"]) != sh["sha256"]:
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
    # raises (before the journal) if a stage's hashes.txt is missing; the pending rows become this journal's
    index = cleanup.enter_context(DedupeIndex.open(root, manifest))
    shard_counts = [sh["count"] for sh in journal["shards"]]
    index.resume(stage, shard_counts, lambda i: shard_pixel_hashes(root / journal["shards"][i]["name"]))
    dedupe = StageDedupe(index)
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(journal_path, journal)  # from now on the stage is pending: a re-run resumes it
    for tmp in sdir.glob(".*.tmp"):  # leftovers of a crash mid-write
        tmp.unlink()

    drops: Counter[str] = Counter(journal["drops"])
    stored: Counter[str] = Counter(journal.get("image", {}))  # kept images stored as_is / reencoded
    kept = sum(sh["count"] for sh in journal["shards"])
    consumed = journal["consumed"]
    pending: list[dict[str, Any]] = []
    examples: dict[str, str] = {}

    def flush(consumed_upto: int) -> None:
        idx = len(journal["shards"])
        name = f"{stage_dir_name(stage)}/{idx:06d}.tar"
        sha = _write_shard(root / name, pending)
        nbytes = (root / name).stat().st_size
        atomic_write_json(root / name.replace(".tar", "_stats.json"), shard_stats(name, pending, sha, nbytes))
        dedupe.commit_shard(idx)  # one transaction, after the tar and before the journal names the shard
        journal["shards"].append({"name": name, "count": len(pending), "sha256": sha, "bytes": nbytes})
        journal["consumed"] = consumed_upto
        journal["drops"] = dict(sorted(drops.items()))
        journal["image"] = dict(sorted(stored.items()))
        atomic_write_json(journal_path, journal)
        logger.info("stage %d: wrote %s (%d samples)", stage, name, len(pending))
        pending.clear()

    progress = _Progress(len(records), consumed, f"ingest stage {stage}")
    try:
        for i, result in enumerate(_prefetched(imap(_process_record, records[consumed:]), dedupe), start=consumed):
            record = records[i]
            if isinstance(result, Dropped):
                drops[result.reason] += 1
                examples.setdefault(result.reason, f"{record.source}: {result.detail}".rstrip(": "))
            elif dedupe.in_earlier_stage(result.pixel_sha256):
                drops["duplicate_across_stages"] += 1
                examples.setdefault("duplicate_across_stages", record.source)
            elif dedupe.in_this_stage(result.pixel_sha256):
                drops["duplicate_in_stage"] += 1
            else:
                dedupe.add(result.pixel_sha256)
                key = f"s{stage:02d}_{kept:08d}"
                kept += 1
                stored["reencoded" if result.reencoded else "as_is"] += 1
                meta = {
                    "key": key,
                    "stage": stage,
                    "source": result.source or record.source,
                    "url": record.url,
                    "orig_width": result.orig_width,
                    "orig_height": result.orig_height,
                    "pixel_sha256": result.pixel_sha256,
                    "jpg_sha256": result.jpg_sha256,
                }
                pending.append(
                    {"__key__": key, "jpg": result.jpg, "txt": result.caption, "json": json.dumps(meta, sort_keys=True)}
                )
                if len(pending) >= shard_size:
                    flush(i + 1)
            progress.update(kept)
        if pending:
            flush(len(records))
    finally:
        progress.close()

    for reason, example in sorted(examples.items()):
        logger.info("stage %d: dropped %d pairs: %s (e.g. %s)", stage, drops[reason], reason, example)
    if kept == 0:  # never append an empty stage: undo the journal and the (empty) stage dir, then fail
        _discard_pending(root, stage, index)
        raise IngestFailed(_nothing_kept(stage, len(records), drops, examples, input_path))
    hashes_sha256 = write_hashes_file(sdir / "hashes.txt", index.pending_sorted())  # streamed, sorted
    shards = journal["shards"]
    source = {"path": source_name or str(input_path), "format": fmt, "records": len(records)}
    entry = {
        "stage": stage,
        "dir": stage_dir_name(stage),
        "count": kept,
        "shards": shards,
        "hashes": f"{stage_dir_name(stage)}/hashes.txt",
        "sources": [{**source, "input_sha256": input_sha256}],
        "options": options,
        "image": {
            "size": options["image_size"],
            "format": "jpeg",
            "resize_mode": options["resize_mode"],
            "as_is": stored["as_is"],
            "reencoded": stored["reencoded"],
        },
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
    manifest["dedupe"] = {"method": DEDUPE_METHOD, "unique": index.unique()}
    save_manifest(root, manifest)  # the manifest entry is written last: the stage now exists
    try:
        index.finish_pending(stage, sdir / "hashes.txt", hashes_sha256)
    except (sqlite3.Error, OSError, IndexDamaged) as exc:  # the stage exists; the cache catches up next time
        logger.warning("%s: stage %d not recorded (%s); the next ingest loads its hashes.txt", index.path, stage, exc)
    shutil.rmtree(journal_path.parent, ignore_errors=True)
    with contextlib.suppress(OSError):  # only if no other stage is pending
        journal_path.parent.parent.rmdir()
    logger.info(
        "stage %d: %d pairs kept of %d in %d shards (%d images stored as is, %d re-encoded to %d px); drops %s",
        stage, kept, len(records), len(shards), stored["as_is"], stored["reencoded"], options["image_size"],
        dict(drops),
    )  # fmt: skip
    return IngestResult(stage, kept, shards, dict(drops), len(records), input_sha256)


def _discard_pending(root: Path, stage: int, index: DedupeIndex) -> None:
    """Remove the journal, the stage dir and the index rows of a stage that wrote no shard (nothing else is in
    them); the index itself too if it holds no other stage."""
    index.discard_pending()
    journal_dir = _journal_path(root, stage).parent
    shutil.rmtree(journal_dir, ignore_errors=True)
    sdir = root / stage_dir_name(stage)
    for leftover in sdir.glob(".*.tmp"):
        leftover.unlink()
    for empty_dir in (journal_dir.parent, sdir, sdir.parent):  # only if empty: never another stage's files
        with contextlib.suppress(OSError):
            empty_dir.rmdir()


def _nothing_kept(stage: int, n: int, drops: Counter[str], examples: dict[str, str], input_path: str | Path) -> str:
    """The one-line message of a run that keeps no pair: what, where, and the fix."""
    what = f"stage {stage} not written: 0 of {n} pairs kept, dropped {_drop_summary(drops)} (--input {input_path})"
    if set(drops) == {"duplicate_across_stages"}:
        fix = "every pair is already in an earlier stage, so there is nothing new to add; ingest new pairs"
    else:
        top = max(drops, key=lambda r: (drops[r], r))
        fix = (
            f"fix the input or relax the filter (data_tools/README.md explains each reason), e.g. "
            f"{top}: {examples.get(top, '')}"
        )
    return f"{what}; nothing was appended; {fix}"


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    """Write one shard (a separate function so tests can simulate a crash between shards)."""
    return write_tar(path, samples)
