"""The on-disk dedupe index (issue #19, item 3): semantics, rebuilds, crash safety with the stage journal.

RAM staying bounded at 10M hashes is measured by benchmarks/dedupe_index.py, not here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from data_tools import ingest as ingest_mod
from data_tools.dedupe import INDEX_NAME, DedupeIndex, StageDedupe, write_hashes_file
from data_tools.ingest import IngestFailed, ingest
from data_tools.manifest import load_manifest, save_manifest
from data_tools.synthetic import make_table_input
from data_tools.validate import validate


# ---------------------------------------------------------------------------------------- helpers
def h(i: int) -> str:
    """A pixel hash (hex) for tests."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def fake_stage(root: Path, stage: int, hashes: list[str]) -> dict[str, Any]:
    """A finished stage's hashes.txt and manifest entry (all DedupeIndex reads of the manifest)."""
    entry = {"stage": stage, "dir": f"shards/stage_{stage:02d}", "hashes": f"shards/stage_{stage:02d}/hashes.txt"}
    write_hashes_file(root / entry["hashes"], sorted(hashes))
    return entry


def index_content(root: Path) -> dict[int | str, set[str]]:
    """What the index holds: finished stage -> hashes, and ``"pending"``."""
    conn = sqlite3.connect(root / INDEX_NAME)
    out: dict[int | str, set[str]] = {}
    for key, stage in conn.execute("SELECT hash, stage FROM hashes"):
        out.setdefault(stage, set()).add(key.hex())
    pending = {key.hex() for (key,) in conn.execute("SELECT hash FROM pending")}
    conn.close()
    if pending:
        out["pending"] = pending
    return out


def stage_files(root: Path) -> dict[int, set[str]]:
    """Each manifest stage's hashes.txt as a set: what the index must hold."""
    return {
        e["stage"]: set((root / e["hashes"]).read_text().split())
        for e in load_manifest(root, missing_ok=False)["stages"]
    }


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the index (a cache whose page layout depends on its history)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(INDEX_NAME))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def two_stage_inputs(tmp: Path) -> tuple[Path, Path]:
    """Stage 1: 6 pictures. Stage 2: 9 new ones, 3 repeats of its own first pictures (in its first shard
    at shard size 3) and 2 of stage 1's: both drop reasons span shards."""
    a = make_table_input(tmp / "a", 6, seed=1)
    b = make_table_input(tmp / "b", 9, seed=2, duplicates=3)
    rows = [json.loads(x) for x in b.read_text().splitlines()]
    for i in range(2):
        (tmp / "b" / "img" / f"again_{i}.png").write_bytes((tmp / "a" / "img" / f"1_{i:05d}.png").read_bytes())
        rows.append({"caption": f"seen in stage 1 {i}", "image": f"img/again_{i}.png"})
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return a, b


EXPECTED_DROPS = {"duplicate_in_stage": 3, "duplicate_across_stages": 2}


# -------------------------------------------------------------------------------------- semantics
def test_lookup_across_and_within_stage(tmp_path: Path) -> None:
    manifest = {"stages": [fake_stage(tmp_path, 1, [h(i) for i in range(5)])]}
    with DedupeIndex.open(tmp_path, manifest) as index:
        assert index.stages() == {1: 5}
        index.resume(2, [], lambda i: [])
        index.add_shard(0, [h(10), h(11)])
        found = index.lookup([h(0), h(4), h(10), h(11), h(12), h(0)])
        assert found.earlier == {h(0), h(4)} and found.this_stage == {h(10), h(11)}

        # a batch whose hashes are kept, committed mid-batch, then repeated: still this stage's
        dedupe = StageDedupe(index)
        batch = [h(20), h(21), h(20), h(3), h(10), h(21)]
        dedupe.prefetch(batch)
        verdicts = []
        for x in batch:
            if dedupe.in_earlier_stage(x):
                verdicts.append("across")
            elif dedupe.in_this_stage(x):
                verdicts.append("within")
            else:
                dedupe.add(x)
                dedupe.commit_shard(1)
                verdicts.append("kept")
        assert verdicts == ["kept", "kept", "within", "across", "within", "within"]

        assert list(index.pending_sorted()) == sorted([h(10), h(11), h(20), h(21)])
        assert index.unique() == 9
        hashes_txt = tmp_path / "shards/stage_02/hashes.txt"
        sha = write_hashes_file(hashes_txt, index.pending_sorted())
        index.finish_pending(2, hashes_txt, sha)
        assert index.stages() == {1: 5, 2: 4} and index.pending_stage() is None
    manifest["stages"].append({"stage": 2, "dir": "shards/stage_02", "hashes": "shards/stage_02/hashes.txt"})
    with DedupeIndex.open(tmp_path, manifest) as index:  # nothing to reload
        assert index.lookup([h(21)]).earlier == {h(21)}
    assert index_content(tmp_path) == {1: {h(i) for i in range(5)}, 2: {h(10), h(11), h(20), h(21)}}


def test_a_changed_or_removed_stage_is_reloaded(tmp_path: Path) -> None:
    one, two = fake_stage(tmp_path, 1, [h(1), h(2)]), fake_stage(tmp_path, 2, [h(3), h(4)])
    DedupeIndex.open(tmp_path, {"stages": [one, two]}).close()
    write_hashes_file(tmp_path / one["hashes"], [h(1)])  # as validate --repair rewrites it
    with DedupeIndex.open(tmp_path, {"stages": [one]}) as index:  # stage 2 left the manifest
        assert index.stages() == {1: 1}
    assert index_content(tmp_path) == {1: {h(1)}}


def test_a_hashes_file_that_is_not_hashes_is_named(tmp_path: Path) -> None:
    entry = fake_stage(tmp_path, 1, [h(1)])
    (tmp_path / entry["hashes"]).write_text(h(1) + "\nnot a hash\n")
    with pytest.raises(ValueError, match=r"hashes.txt line 2 is not a pixel hash .*validate .* --repair"):
        DedupeIndex.open(tmp_path, {"stages": [entry]})
    (tmp_path / entry["hashes"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"hashes.txt is missing.*--repair"):
        DedupeIndex.open(tmp_path, {"stages": [entry]})


# ---------------------------------------------------------------------------------------- rebuilds
@pytest.mark.parametrize("damage", ["deleted", "garbage", "garbage_after_header", "empty"])
def test_index_rebuilt_from_hashes_txt(tmp_path: Path, damage: str) -> None:
    a, b = two_stage_inputs(tmp_path)
    root = tmp_path / "root"
    ingest(a, "table", root, shard_size=3)
    index_file = root / INDEX_NAME
    if damage == "deleted":
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_bytes(b"\x13garbage" * 4096)
    elif damage == "garbage_after_header":  # the SQLite header survives, the schema page does not
        data = bytearray(index_file.read_bytes())
        data[100:] = b"\xa5" * (len(data) - 100)
        index_file.write_bytes(bytes(data))
    else:
        index_file.write_bytes(b"")
    res = ingest(b, "table", root, shard_size=3)
    assert res.drops == EXPECTED_DROPS and res.count == 9
    assert index_content(root) == stage_files(root)
    assert load_manifest(root)["dedupe"]["unique"] == 15


@pytest.mark.parametrize("damage", ["cut_line", "extra_line"])
def test_repair_rewrites_a_damaged_hashes_txt_and_the_index_follows(tmp_path: Path, damage: str) -> None:
    a, b = two_stage_inputs(tmp_path)
    root = tmp_path / "root"
    ingest(a, "table", root, shard_size=3)
    hashes_txt = root / "shards/stage_01/hashes.txt"
    good = hashes_txt.read_bytes()
    if damage == "cut_line":
        hashes_txt.write_bytes(good[:70] + b"\xff\xfe garbage\n" + good[70:])
    else:
        hashes_txt.write_bytes(good + b"zz\n")
    with pytest.raises(ValueError, match=f"line {2 if damage == 'cut_line' else 7} is not a pixel hash"):
        ingest(b, "table", root, shard_size=3)
    assert validate(root, repair=True).ok
    assert hashes_txt.read_bytes() == good
    assert ingest(b, "table", root, shard_size=3).drops == EXPECTED_DROPS


def test_repair_rewrites_a_missing_hashes_txt(tmp_path: Path) -> None:
    a, b = two_stage_inputs(tmp_path)
    root = tmp_path / "root"
    ingest(a, "table", root, shard_size=3)
    hashes_txt = root / "shards/stage_01/hashes.txt"
    good = hashes_txt.read_bytes()
    hashes_txt.unlink()
    with pytest.raises(FileNotFoundError, match=r"hashes.txt is missing.*validate .* --repair"):
        ingest(b, "table", root, shard_size=3)
    assert validate(root, repair=True).ok and hashes_txt.read_bytes() == good
    assert ingest(b, "table", root, shard_size=3).drops == EXPECTED_DROPS


# ------------------------------------------------------------------------------------ crash safety
def test_a_stage_the_index_did_not_record_is_loaded_next_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash (here: an error) after the manifest names the stage and before the index moves its rows."""
    a, b = two_stage_inputs(tmp_path)
    root = tmp_path / "root"

    def fail(*args: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(DedupeIndex, "finish_pending", fail)
    assert ingest(a, "table", root, shard_size=3).count == 6  # the stage exists all the same
    monkeypatch.undo()
    assert not (root / ".ingest").exists()
    assert index_content(root) == {"pending": stage_files(root)[1]}
    assert ingest(b, "table", root, shard_size=3).drops == EXPECTED_DROPS
    assert index_content(root) == stage_files(root)


def _crash_on(monkeypatch: pytest.MonkeyPatch, point: str, n: int) -> None:
    """Raise KeyboardInterrupt at the ``n``-th shard's ``point``: before its tar is written, after its hashes are
    committed (before the journal names it), or after the journal names it."""
    calls = {"n": 0}

    def tick() -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"simulated crash at {point} of shard {n - 1}")

    if point == "tar":
        real_write = ingest_mod._write_shard

        def write(path: Path, samples: list) -> str:
            tick()
            return real_write(path, samples)

        monkeypatch.setattr(ingest_mod, "_write_shard", write)
    elif point == "insert":
        real_commit = StageDedupe.commit_shard

        def commit(self: StageDedupe, shard: int) -> None:
            real_commit(self, shard)
            tick()

        monkeypatch.setattr(StageDedupe, "commit_shard", commit)
    else:
        real_json = ingest_mod.atomic_write_json

        def write_json(path: Path, obj: Any, **kw: Any) -> None:
            real_json(path, obj, **kw)
            if Path(path).name == "journal.json" and obj["shards"]:
                tick()

        monkeypatch.setattr(ingest_mod, "atomic_write_json", write_json)


@pytest.mark.parametrize("point,lose_index", [("tar", False), ("insert", False), ("journal", False), ("insert", True)])
def test_crash_then_resume_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, lose_index: bool
) -> None:
    a, b = two_stage_inputs(tmp_path)
    clean, root = tmp_path / "clean", tmp_path / "root"
    for r in (clean, root):
        ingest(a, "table", r, shard_size=3)
    want = ingest(b, "table", clean, shard_size=3)
    assert want.drops == EXPECTED_DROPS

    _crash_on(monkeypatch, point, 2)
    with pytest.raises(KeyboardInterrupt):
        ingest(b, "table", root, shard_size=3)
    monkeypatch.undo()
    journal = json.loads((root / ".ingest/stage_02/journal.json").read_text())
    assert journal["version"] == ingest_mod.JOURNAL_VERSION and "hashes" not in journal["shards"][0]
    if lose_index:  # the journaled shards' hashes are read back from their tars
        (root / INDEX_NAME).unlink()
    got = ingest(b, "table", root, shard_size=3)
    assert (got.stage, got.count, got.drops) == (want.stage, want.count, want.drops)
    assert tree_bytes(root) == tree_bytes(clean)
    assert index_content(root) == index_content(clean) == stage_files(root)


def test_a_journal_of_version_2_is_refused_with_the_fix(tmp_path: Path) -> None:
    a, _ = two_stage_inputs(tmp_path)
    journal = tmp_path / "root/.ingest/stage_01/journal.json"
    journal.parent.mkdir(parents=True)
    shard = {"name": "shards/stage_01/000000.tar", "count": 1, "sha256": "0" * 64, "bytes": 1, "hashes": [h(1)]}
    journal.write_text(json.dumps({"version": 2, "fingerprint": "x", "shards": [shard], "consumed": 1, "drops": {}}))
    with pytest.raises(ValueError, match=r"older version \(journal version 2, this one writes 3\).*delete"):
        ingest(a, "table", tmp_path / "root", shard_size=3)


# ------------------------------------------------------------------------------------- leftovers
def test_leftover_rows_of_a_discarded_stage_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_stage_inputs(tmp_path)
    root = tmp_path / "root"
    ingest(a, "table", root, shard_size=3)
    stage1_manifest = load_manifest(root)

    # a pending stage 2 given up by hand, as the resume errors say: its rows must not count
    _crash_on(monkeypatch, "tar", 3)
    with pytest.raises(KeyboardInterrupt):
        ingest(b, "table", root, shard_size=3)
    monkeypatch.undo()
    assert "pending" in index_content(root)
    shutil.rmtree(root / ".ingest")
    shutil.rmtree(root / "shards/stage_02")
    b2 = tmp_path / "b" / "again.jsonl"  # another input (no resume) with the same pictures
    b2.write_text(b.read_text().replace("picture number", "image number"))
    assert ingest(b2, "table", root, shard_size=3).drops == EXPECTED_DROPS

    # a finished stage 2 that left the manifest (an older manifest restored): its rows must not count
    save_manifest(root, stage1_manifest)
    shutil.rmtree(root / "shards/stage_02")
    assert ingest(b, "table", root, shard_size=3).drops == EXPECTED_DROPS
    assert index_content(root) == stage_files(root)


def test_a_stage_that_keeps_nothing_leaves_no_rows(tmp_path: Path) -> None:
    a, _ = two_stage_inputs(tmp_path)
    root = tmp_path / "root"
    ingest(a, "table", root, shard_size=3)
    again = tmp_path / "a" / "again.jsonl"
    again.write_text(a.read_text().replace("picture number", "same picture"))
    with pytest.raises(IngestFailed, match="already in an earlier stage"):
        ingest(again, "table", root, shard_size=3)
    assert index_content(root) == stage_files(root)
    with DedupeIndex.open(root, load_manifest(root)) as index:
        assert index.pending_stage() is None

    # a first ingest that keeps nothing leaves no index either
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"caption": "a caption", "image": str(tmp_path / "missing.png")}) + "\n")
    with pytest.raises(IngestFailed):
        ingest(empty, "table", tmp_path / "fresh")
    assert not (tmp_path / "fresh" / INDEX_NAME).exists()
