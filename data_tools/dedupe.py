"""The dedupe index: the pixel hashes of every stage on disk, in ``DATA_ROOT/dedupe.sqlite`` (issue #19).

Ingest drops a pair whose pixels (``pixel_sha256``, :data:`data_tools.manifest.DEDUPE_METHOD`) are in an earlier
stage (``duplicate_across_stages``) or earlier in its own stage (``duplicate_in_stage``). Held as Python sets, the
hashes took ≈0.6 GB of RAM per million pairs; here they live in SQLite (stdlib) and RAM is bounded by its page
cache (:data:`CACHE_MIB`), whatever the corpus size (benchmarks/dedupe_index.py: 10M hashes).

Tables (``WITHOUT ROWID``, keyed by the 32-byte hash as a BLOB, so the key is the row):

* ``hashes(hash, stage)``: every finished stage;
* ``pending(hash, shard)``: the stage being ingested, with the shard that holds each hash. Apart from ``hashes`` so
  that what is done to the pending stage (resume, discard, its sorted ``hashes.txt``) costs the stage's size, not
  the corpus's; it moves into ``hashes`` in one sorted pass when the stage is in the manifest;
* ``stages(stage, path, bytes, mtime_ns, sha256, count, shadowed)``: the finished stages held and the
  ``hashes.txt`` each was loaded from; ``meta``: which stage the pending rows belong to.

The index is a derived cache. Each stage's ``hashes.txt`` stays the durable record (``validate``, the manifest):
:meth:`DedupeIndex.open` brings the index in line with the manifest before use. A missing or damaged file is
rebuilt; a manifest stage it does not hold, or whose ``hashes.txt`` changed since (``validate --repair`` rewrote
it: size and mtime first, then sha256), is (re)loaded, streaming; rows of a stage the manifest no longer has (a
discarded or removed stage) are deleted.

Crash safety with the ingest journal: per shard, ingest writes the tar, inserts its hashes in one transaction
(:meth:`DedupeIndex.add_shard`), then updates the journal. :meth:`DedupeIndex.resume` deletes the pending rows of
shards the journal does not list, and re-reads the journaled shards' hashes from their tars when the index lost
them (it was deleted or rebuilt mid-stage).

Every access holds ``DATA_ROOT/.lock`` (one writer: ingest, build-offline), so SQLite's own file locking is off
(``nolock=1``): POSIX locks are unreliable on Lustre and NFS, where DATA_ROOT usually lives. For the same reason
the journal is a rollback journal, not WAL (WAL needs shared memory); ``synchronous=FULL`` makes a shard's commit
durable before the journal names the shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from data_tools.atomic import atomic_open
from data_tools.manifest import sha256_file

__all__ = [
    "INDEX_NAME",
    "DedupeIndex",
    "Found",
    "StageDedupe",
    "pixel_hash_key",
    "IndexDamaged",
    "stage_hashes_path",
    "write_hashes_file",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "dedupe.sqlite"  # in DATA_ROOT
SCHEMA_VERSION = 1  # PRAGMA user_version; another value: the index is rebuilt
CACHE_MIB = 64  # SQLite page cache: the index's RAM, whatever the corpus size
LOOKUP_CHUNK = 400  # hashes per SELECT ... IN (...): two lists of host parameters under SQLite's old 999 limit
LOAD_CHUNK = 10_000  # rows per executemany when loading a hashes.txt

_SCHEMA = (
    "CREATE TABLE hashes (hash BLOB PRIMARY KEY, stage INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE pending (hash BLOB PRIMARY KEY, shard INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE stages (stage INTEGER PRIMARY KEY, path TEXT NOT NULL, bytes INTEGER NOT NULL, "
    "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, count INTEGER NOT NULL, shadowed INTEGER NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class Found(NamedTuple):
    """Which of the looked-up hashes the index holds (hex, as given)."""

    earlier: set[str]  # in a finished stage
    this_stage: set[str]  # in the pending stage (a shard already committed)


class IndexDamaged(RuntimeError):
    """SQLite found the index file damaged while in use; it was removed (a cache) and is rebuilt on the next run."""


class _StageFile(NamedTuple):
    path: str
    bytes: int
    mtime_ns: int
    sha256: str
    count: int
    shadowed: int  # lines not inserted: the hash was already held (another stage's, or a repeat in the file)


def stage_hashes_path(data_root: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """A manifest stage's ``hashes.txt`` (the durable list of its pixel hashes)."""
    return Path(data_root) / entry.get("hashes", f"{entry['dir']}/hashes.txt")


def pixel_hash_key(text: str | bytes) -> bytes | None:
    """A ``hashes.txt`` line (the sha256 hex of an image's pixels) as its 32-byte key; None when it is not one."""
    try:
        key = bytes.fromhex(text.decode("ascii") if isinstance(text, bytes) else text) if len(text) == 64 else b""
    except (UnicodeDecodeError, ValueError):
        return None
    return key if len(key) == 32 else None


def write_hashes_file(path: str | os.PathLike[str], hashes: Iterable[str]) -> str:
    """Atomically write ``hashes`` one a line, streamed (never all in memory); return the file's sha256."""
    digest = hashlib.sha256()
    with atomic_open(path, "wb") as fh:
        for h in hashes:
            line = f"{h}\n".encode()
            digest.update(line)
            fh.write(line)
    return digest.hexdigest()


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB (not a full disk or an I/O error, which say nothing about the file)."""
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    return type(exc) is sqlite3.DatabaseError


def _remove_index(path: Path) -> None:
    """Delete the index and its rollback journal (a stale journal must never be played into a new file)."""
    for p in (path, path.with_name(path.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class DedupeIndex:
    """``DATA_ROOT/dedupe.sqlite``: open it with :meth:`open` (``DATA_ROOT/.lock`` held), as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path, data_root: Path) -> None:
        self.conn, self.path, self.data_root = conn, path, data_root

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, data_root: str | os.PathLike[str], manifest: dict[str, Any]) -> DedupeIndex:
        """Open (or create) the index of ``data_root`` and bring it in line with ``manifest``.

        Pending rows survive unless their stage is now in the manifest; :meth:`resume` aligns them with a journal.

        Raises:
            FileNotFoundError: a manifest stage's ``hashes.txt`` is missing (the message says the fix).
            ValueError: a ``hashes.txt`` holds a line that is not a pixel hash (the message says the fix).
        """
        root = Path(data_root)
        path = root / INDEX_NAME
        for entry in manifest["stages"]:  # before touching anything
            hashes = stage_hashes_path(root, entry)
            if not hashes.is_file():
                raise FileNotFoundError(
                    f"{hashes} is missing: cross-stage dedupe needs it; run `python -m data_tools validate {root} "
                    "--repair` to rewrite it from the stage's shards"
                )
        index = cls._connect(root, path)
        try:
            try:
                index._sync(manifest)
            except (sqlite3.DatabaseError, IndexDamaged) as exc:
                if isinstance(exc, sqlite3.DatabaseError) and not _is_damage(exc):
                    raise
                logger.warning("%s is damaged (%s); rebuilding it from the stages' hashes.txt", path, exc)
                index.close()
                _remove_index(path)
                index = cls._connect(root, path)
                index._sync(manifest)
        except BaseException:
            index.close()
            raise
        return index

    @classmethod
    def _connect(cls, root: Path, path: Path) -> DedupeIndex:
        """Connect, checking the file is an index of this schema; a damaged or foreign one is replaced."""
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?nolock=1", uri=True, timeout=30, isolation_level=None)
            try:
                conn.execute(f"PRAGMA cache_size = -{CACHE_MIB * 1024}")
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute("PRAGMA synchronous = FULL")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if version == SCHEMA_VERSION and tables >= {"hashes", "pending", "stages", "meta"}:
                    return cls(conn, path, root)
                if not tables:  # a new file
                    with _transaction(conn):
                        for sql in _SCHEMA:
                            conn.execute(sql)
                    return cls(conn, path, root)
                why = f"schema version {version}, this one is {SCHEMA_VERSION}"
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc) or attempt:
                    conn.close()
                    raise
                why = str(exc)
            conn.close()
            logger.warning("%s is not a usable dedupe index (%s); rebuilding it from the stages' hashes.txt", path, why)
            _remove_index(path)
        raise AssertionError("unreachable: a new index file is always usable")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.conn.close()

    def __enter__(self) -> DedupeIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- manifest alignment
    def _sync(self, manifest: dict[str, Any]) -> None:
        """Make the finished stages held exactly the manifest's, each as its ``hashes.txt`` says."""
        wanted = {entry["stage"]: stage_hashes_path(self.data_root, entry) for entry in manifest["stages"]}
        held = {row[0]: _StageFile(*row[1:]) for row in self.conn.execute("SELECT * FROM stages")}
        pending = self.pending_stage()
        if pending is not None and pending in wanted:  # it finished (crash before finish_pending): load hashes.txt
            with _transaction(self.conn):
                self._clear_pending()
        gone = sorted(s for s in held if s not in wanted)
        changed = sorted(s for s in wanted if s in held and not self._same_file(s, held[s], wanted[s]))
        new = sorted(s for s in wanted if s not in held)
        if (gone or changed) and any(f.shadowed for f in held.values()):
            # a hash another stage also listed may be held under the stage about to be deleted: start over
            logger.warning("%s: stages %s changed and stages overlap; reloading every stage", self.path, gone + changed)
            with _transaction(self.conn):
                self.conn.execute("DELETE FROM hashes")
                self.conn.execute("DELETE FROM stages")
            gone, changed, new = [], [], sorted(wanted)
        for stage in gone + changed:
            logger.info("%s: dropping stage %d (%s)", self.path, stage, "changed" if stage in changed else "gone")
            with _transaction(self.conn):
                self.conn.execute("DELETE FROM hashes WHERE stage = ?", (stage,))  # a full scan: only on a change
                self.conn.execute("DELETE FROM stages WHERE stage = ?", (stage,))
        for stage in sorted(changed + new):
            self._load_stage(stage, wanted[stage])

    def _same_file(self, stage: int, held: _StageFile, path: Path) -> bool:
        """Whether ``path`` is still the file the stage was loaded from (stat first, then sha256)."""
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (held.bytes, held.mtime_ns):
            return True
        if st.st_size != held.bytes or sha256_file(path) != held.sha256:
            return False
        with _transaction(self.conn):  # same content, touched (a copy): remember the new stat
            self.conn.execute("UPDATE stages SET mtime_ns = ? WHERE stage = ?", (st.st_mtime_ns, stage))
        return True

    def _load_stage(self, stage: int, path: Path) -> None:
        """Insert a finished stage's ``hashes.txt`` (streamed, one transaction) and record the file."""
        digest = hashlib.sha256()
        count = before = 0
        with _transaction(self.conn), open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            before = self.conn.total_changes
            batch: list[tuple[bytes, int]] = []
            for n, line in enumerate(fh, start=1):
                digest.update(line)
                text = line.strip()
                if not text:
                    continue
                batch.append((self._blob(text, path, n), stage))
                if len(batch) >= LOAD_CHUNK:
                    self.conn.executemany("INSERT OR IGNORE INTO hashes VALUES (?, ?)", batch)
                    count += len(batch)
                    batch.clear()
            self.conn.executemany("INSERT OR IGNORE INTO hashes VALUES (?, ?)", batch)
            count += len(batch)
            inserted = self.conn.total_changes - before
            rel = os.path.relpath(path, self.data_root)
            self.conn.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stage, rel, st.st_size, st.st_mtime_ns, digest.hexdigest(), count, count - inserted),
            )
        logger.info("%s: loaded stage %d from %s (%d hashes)", self.path, stage, path, count)

    def _blob(self, text: bytes, path: Path, line: int) -> bytes:
        """One ``hashes.txt`` line as the 32-byte key."""
        key = pixel_hash_key(text)
        if key is None:
            raise ValueError(
                f"{path} line {line} is not a pixel hash ({text[:80]!r}): the file was edited or damaged; restore it, "
                f"or delete it and run `python -m data_tools validate {self.data_root} --repair` to rewrite it from "
                "the stage's shards"
            )
        return key

    # -------------------------------------------------------------------------------------- lookup
    def lookup(self, hashes: Sequence[str]) -> Found:
        """Which of ``hashes`` (hex) are in a finished stage, and which in the pending stage: one query per chunk."""
        found = Found(set(), set())
        keys = [bytes.fromhex(h) for h in hashes]
        for i in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[i : i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = (
                f"SELECT hash, 0 FROM hashes WHERE hash IN ({marks}) "
                f"UNION ALL SELECT hash, 1 FROM pending WHERE hash IN ({marks})"
            )
            for key, in_pending in self._run(query, chunk + chunk):
                (found.this_stage if in_pending else found.earlier).add(key.hex())
        return found

    def stages(self) -> dict[int, int]:
        """The finished stages held: stage -> number of hashes in its ``hashes.txt``."""
        return dict(self._run("SELECT stage, count FROM stages ORDER BY stage"))

    def unique(self) -> int:
        """Distinct hashes held, finished and pending stages together (one COUNT per table)."""
        return self._run("SELECT (SELECT COUNT(*) FROM hashes) + (SELECT COUNT(*) FROM pending)").fetchone()[0]

    # ----------------------------------------------------------------------------- pending stage
    def pending_stage(self) -> int | None:
        """The stage the pending rows belong to, if any."""
        row = self._run("SELECT value FROM meta WHERE key = 'pending_stage'").fetchone()
        return None if row is None else int(row[0])

    def resume(self, stage: int, shard_counts: Sequence[int], shard_hashes: Callable[[int], Iterable[str]]) -> None:
        """Make the pending rows exactly those of ``stage``'s journaled shards, before ingest continues.

        Args:
            stage: the stage being ingested.
            shard_counts: hashes per shard the journal lists (``[]`` for a fresh stage).
            shard_hashes: the hashes of journaled shard ``i``, read from its tar: used only when the index lost
                them (deleted or rebuilt mid-stage).
        """
        with _transaction(self.conn):
            if self.pending_stage() != stage:  # another stage's leftovers (discarded, or journal deleted)
                self._clear_pending(stage)
            # a shard committed here but not journaled (a crash between the two): it is written again
            self.conn.execute("DELETE FROM pending WHERE shard >= ?", (len(shard_counts),))
        held = dict(self._run("SELECT shard, COUNT(*) FROM pending GROUP BY shard"))
        if all(held.get(i, 0) == n for i, n in enumerate(shard_counts)):
            return
        logger.warning("%s: stage %d's finished shards are not all indexed; re-reading them", self.path, stage)
        with _transaction(self.conn):
            self._clear_pending(stage)
        for i in range(len(shard_counts)):
            with _transaction(self.conn):
                rows = ((bytes.fromhex(h), i) for h in shard_hashes(i))
                self.conn.executemany("INSERT OR IGNORE INTO pending VALUES (?, ?)", rows)

    def add_shard(self, shard: int, hashes: Iterable[str]) -> None:
        """Insert the hashes of the pending stage's shard ``shard`` in one transaction (after its tar is written)."""
        with _transaction(self.conn):
            rows = [(key, shard) for key in sorted(map(bytes.fromhex, hashes))]  # in key order: fewer page visits
            self._run_many("INSERT INTO pending VALUES (?, ?)", rows)

    def pending_sorted(self) -> Iterator[str]:
        """The pending stage's hashes (hex) in sorted order, streamed."""
        for (key,) in self._run("SELECT hash FROM pending ORDER BY hash"):
            yield key.hex()

    def finish_pending(self, stage: int, hashes_file: Path, sha256: str) -> None:
        """The stage is in the manifest: move its rows into the finished ones, recording its ``hashes.txt``."""
        st = hashes_file.stat()
        with _transaction(self.conn):
            count = self._run("SELECT COUNT(*) FROM pending").fetchone()[0]
            before = self.conn.total_changes
            self._run("INSERT OR IGNORE INTO hashes SELECT hash, ? FROM pending ORDER BY hash", (stage,))
            inserted = self.conn.total_changes - before
            self._clear_pending()
            rel = os.path.relpath(hashes_file, self.data_root)
            self._run(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stage, rel, st.st_size, st.st_mtime_ns, sha256, count, count - inserted),
            )

    def discard_pending(self) -> None:
        """Delete the pending rows (a stage that keeps nothing); an index left without any stage is removed too,
        so a failed first ingest leaves no trace. The index is closed when removed."""
        with _transaction(self.conn):
            self._clear_pending()
        if not self.stages():
            self.close()
            _remove_index(self.path)

    def _clear_pending(self, stage: int | None = None) -> None:
        """Inside a transaction: drop the pending rows; mark them as ``stage``'s from now on (None: no stage)."""
        self.conn.execute("DELETE FROM pending")
        if stage is None:
            self.conn.execute("DELETE FROM meta WHERE key = 'pending_stage'")
        else:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('pending_stage', ?)", (stage,))

    # ---------------------------------------------------------------------------------- plumbing
    def _run(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            self._damaged(exc)
            raise

    def _run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.DatabaseError as exc:
            self._damaged(exc)
            raise

    def _damaged(self, exc: sqlite3.DatabaseError) -> None:
        """A damaged file found mid-use: remove it (it is a cache) and say so; other errors pass through."""
        if not _is_damage(exc):
            return
        self.close()
        _remove_index(self.path)
        raise IndexDamaged(
            f"{self.path} is damaged ({exc}) and was removed: it is a cache of the stages' hashes.txt; run the same "
            "command again, which rebuilds it (an interrupted ingest resumes)"
        ) from exc


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT (ROLLBACK on any error); the connection is in autocommit mode otherwise."""
    if conn.in_transaction:  # nested: part of the enclosing one
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class StageDedupe:
    """Classify the pending stage's pairs in input order, with the index looked up once per batch.

    Call :meth:`prefetch` with the hashes of the next batch before classifying them. A hash is in this stage when
    the index holds it as pending, or it was kept since the lookup (the shard being filled, then possibly
    committed mid-batch): that in-memory set is bounded by the shard size plus the batch size.
    """

    def __init__(self, index: DedupeIndex) -> None:
        self.index = index
        self.unflushed: list[str] = []  # kept, not yet committed: the shard being filled
        self._found = Found(set(), set())
        self._recent: set[str] = set()

    def prefetch(self, hashes: Sequence[str]) -> None:
        """Look up the next batch's hashes (committed shards are in the index from now on)."""
        self._found = self.index.lookup(hashes)
        self._recent = set(self.unflushed)

    def in_earlier_stage(self, pixel_sha256: str) -> bool:
        """``duplicate_across_stages``."""
        return pixel_sha256 in self._found.earlier

    def in_this_stage(self, pixel_sha256: str) -> bool:
        """``duplicate_in_stage``."""
        return pixel_sha256 in self._found.this_stage or pixel_sha256 in self._recent

    def add(self, pixel_sha256: str) -> None:
        """A kept pair: a duplicate from now on."""
        self._recent.add(pixel_sha256)
        self.unflushed.append(pixel_sha256)

    def commit_shard(self, shard: int) -> None:
        """Insert the filled shard's hashes (its tar is written; the journal is updated next)."""
        self.index.add_shard(shard, self.unflushed)
        self.unflushed.clear()
