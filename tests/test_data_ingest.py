"""Ingest: round trip, append-only stages, cross-stage dedupe, bad inputs, resume, determinism (issue #4)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from data_tools import ingest as ingest_mod
from data_tools.cli import main as cli_main
from data_tools.dedupe import INDEX_NAME
from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest
from data_tools.manifest import load_manifest
from data_tools.synthetic import BAD_CASES, make_img2dataset_input, make_table_input
from data_tools.validate import validate


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except the dedupe index (a cache: SQLite's page layout depends on the history of
    its writes; tests/test_dedupe_index.py compares its content), relative path -> bytes."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(INDEX_NAME))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return sorted({m.name.split(".")[0] for m in tf})


def test_roundtrip_table(tmp_path: Path) -> None:
    table = make_table_input(tmp_path / "in", 25, seed=1)
    res = ingest(table, "table", tmp_path / "root", shard_size=10)
    assert (res.stage, res.count, res.drops) == (1, 25, {})
    m = load_manifest(tmp_path / "root", missing_ok=False)
    (stage,) = m["stages"]
    assert [s["count"] for s in stage["shards"]] == [10, 10, 5]
    assert stage["shards"][0]["name"] == "shards/stage_01/000000.tar"
    for sh in stage["shards"]:
        assert (tmp_path / "root" / sh["name"].replace(".tar", "_stats.json")).exists()
    with tarfile.open(tmp_path / "root/shards/stage_01/000000.tar") as tf:
        names = tf.getnames()
        assert names[:3] == ["s01_00000000.jpg", "s01_00000000.json", "s01_00000000.txt"]
        meta = json.loads(tf.extractfile("s01_00000000.json").read())
        info = tf.getmember("s01_00000000.jpg")
    assert {"source", "orig_width", "orig_height", "pixel_sha256", "jpg_sha256"} <= set(meta)
    assert (meta["orig_width"], meta["orig_height"]) == (48, 40)
    assert (info.mtime, info.uname, info.uid) == (ingest_mod.TAR_MTIME, ingest_mod.TAR_USER, 0)
    report = validate(tmp_path / "root")
    assert report.ok and report.samples == 25, report.render()
    assert not (tmp_path / "root/.ingest").exists()


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_img2dataset_layouts(tmp_path: Path, layout: str) -> None:
    src = make_img2dataset_input(tmp_path / "crawl", 12, layout=layout)
    res = ingest(src, "img2dataset", tmp_path / "root", shard_size=5)
    assert res.count == 12 and res.drops == {}
    with tarfile.open(tmp_path / "root/shards/stage_01/000000.tar") as tf:
        meta = json.loads(tf.extractfile("s01_00000000.json").read())
        assert tf.extractfile("s01_00000000.txt").read() == b"crawled caption 0"
    assert meta["url"] == "https://example.com/0.jpg"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_formats(tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="parquet input needs PyPI pyarrow")
    table = make_table_input(tmp_path / "in", 6, fmt=fmt)
    assert ingest(table, "table", tmp_path / "root").count == 6


def test_table_column_error_names_fix(tmp_path: Path) -> None:
    table = make_table_input(tmp_path / "in", 2)
    with pytest.raises(ValueError, match="--caption-col"):
        ingest(table, "table", tmp_path / "root", caption_col="text")


def test_second_stage_appends_and_dedupes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ingest(make_table_input(tmp_path / "a", 12, seed=1), "table", root, shard_size=5)
    before = {p: b for p, b in tree_bytes(root).items() if p.startswith("shards/stage_01")}
    # stage 2: 8 new images plus 4 that stage 1 already has (same pixels, new file names and captions)
    b = make_table_input(tmp_path / "b", 8, seed=2)
    rows = [json.loads(x) for x in b.read_text().splitlines()]
    for i in range(4):
        src = tmp_path / "a" / "img" / f"1_{i:05d}.png"
        (tmp_path / "b" / "img" / f"again_{i}.png").write_bytes(src.read_bytes())
        rows.append({"caption": f"seen before {i}", "image": f"img/again_{i}.png"})
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = ingest(b, "table", root, shard_size=5)
    assert res.stage == 2 and res.count == 8
    assert res.drops == {"duplicate_across_stages": 4}
    after = tree_bytes(root)
    assert all(after[p] == data for p, data in before.items()), "stage 1 shards changed"
    m = load_manifest(root)
    assert [s["stage"] for s in m["stages"]] == [1, 2]
    assert m["stages"][1]["dedupe"]["across_stages"] == 4 and m["dedupe"]["unique"] == 20
    assert shard_keys(root / "shards/stage_02/000000.tar")[0] == "s02_00000000"
    with pytest.raises(ValueError, match="append-only"):
        ingest(b, "table", root, stage=1)
    assert validate(root).ok


def test_bad_inputs_counted_by_reason(tmp_path: Path) -> None:
    table = make_table_input(tmp_path / "in", 5, bad=True, duplicates=2)
    res = ingest(table, "table", tmp_path / "root")
    expected: dict[str, int] = {"duplicate_in_stage": 2}
    for case in BAD_CASES:
        reason = case.split(":")[0]
        expected[reason] = expected.get(reason, 0) + 1
    assert res.drops == expected
    assert res.count == 5 and res.records == 5 + 2 + len(BAD_CASES)
    assert load_manifest(tmp_path / "root")["stages"][0]["drops"] == expected


def test_caption_too_long_and_options(tmp_path: Path) -> None:
    table = make_table_input(tmp_path / "in", 3)
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    rows[0]["caption"] = "word " * 200
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ImageOptions(image_size=32, resize_mode="center_crop", max_caption_chars=100)
    res = ingest(table, "table", tmp_path / "root", opts=opts)
    assert res.drops == {"caption_too_long": 1}
    from PIL import Image

    with tarfile.open(tmp_path / "root/shards/stage_01/000000.tar") as tf:
        assert Image.open(tf.extractfile("s01_00000000.jpg")).size == (32, 32)


def test_interrupted_ingest_resumes_to_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = make_table_input(tmp_path / "in", 23, bad=True)
    ingest(table, "table", tmp_path / "clean", shard_size=5)

    real = ingest_mod._write_shard
    calls = {"n": 0}

    def crash_after_first(path: Path, samples: list) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-stage")
        return real(path, samples)

    monkeypatch.setattr(ingest_mod, "_write_shard", crash_after_first)
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        ingest(table, "table", root, shard_size=5)
    assert load_manifest(root)["stages"] == [], "an interrupted stage must not be in the manifest"
    assert (root / ".ingest/stage_01/journal.json").exists()
    monkeypatch.setattr(ingest_mod, "_write_shard", real)
    res = ingest(table, "table", root, shard_size=5)  # no --stage: the pending stage is completed
    assert res.stage == 1 and res.count == 23
    assert tree_bytes(root) == tree_bytes(tmp_path / "clean")
    # a resume with different options is refused with the fix in the message
    with pytest.raises(ValueError, match="append-only"):
        ingest(table, "table", root, stage=1, shard_size=7)


def test_resume_with_other_options_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = make_table_input(tmp_path / "in", 12)

    def crash(path: Path, samples: list) -> str:
        raise RuntimeError("crash")

    monkeypatch.setattr(ingest_mod, "_write_shard", crash)
    with pytest.raises(RuntimeError):
        ingest(table, "table", tmp_path / "root", shard_size=5)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different input or options"):
        ingest(table, "table", tmp_path / "root", shard_size=6)


def test_deterministic_and_worker_count_independent(tmp_path: Path) -> None:
    table = make_table_input(tmp_path / "in", 30, bad=True, duplicates=3)
    ingest(table, "table", tmp_path / "r1", shard_size=7, workers=1)
    ingest(table, "table", tmp_path / "r2", shard_size=7, workers=1)
    ingest(table, "table", tmp_path / "r3", shard_size=7, workers=2)
    one = tree_bytes(tmp_path / "r1")
    assert one == tree_bytes(tmp_path / "r2")
    assert one == tree_bytes(tmp_path / "r3")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_validate_detects_and_repair_keeps_good_samples(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ingest(make_table_input(tmp_path / "in", 15), "table", root, shard_size=5)
    s0, s1, s2 = (root / f"shards/stage_01/{i:06d}.tar" for i in range(3))
    keys_s0 = shard_keys(s0)
    flip_byte(s0, 100)  # inside the first member's tar header
    with tarfile.open(s1) as tf:
        jpg = tf.getmember(shard_keys(s1)[2] + ".jpg")
    flip_byte(s1, jpg.offset_data + jpg.size // 2)  # inside one JPEG's bytes
    s2.unlink()
    report = validate(root)
    assert not report.ok
    assert {p.shard for p in report.bad} == {f"shards/stage_01/{i:06d}.tar" for i in range(3)}
    assert cli_main(["validate", str(root)]) == 1

    report = validate(root, repair=True)
    assert report.ok, report.render()
    assert report.lost == 1 + 1 + 5  # the damaged member, the damaged JPEG, the missing shard
    assert (root / "quarantine/stage_01/000000.tar").exists() and (root / "quarantine/stage_01/000001.tar").exists()
    assert shard_keys(s0) == keys_s0[1:]  # every intact sample of the shard was re-packed
    assert len(shard_keys(s1)) == 4
    m = load_manifest(root)
    assert m["stages"][0]["count"] == 8 and len(m["stages"][0]["shards"]) == 2
    assert validate(root).ok
    assert cli_main(["validate", str(root)]) == 0


def test_cli_ingest_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = make_table_input(tmp_path / "in", 4)
    argv = ["ingest", "--input", str(table), "--format", "table", "--data-root", str(tmp_path / "root")]
    assert cli_main([*argv, "--image-size", "32", "--workers", "2"]) == 0
    assert "kept 4 of 4" in capsys.readouterr().out
    assert cli_main([*argv, "--stage", "1"]) == 2
    assert "append-only" in capsys.readouterr().err
    fresh_root = tmp_path / "never-created"
    assert (
        cli_main(["ingest", "--input", str(tmp_path / "nope"), "--format", "table", "--data-root", str(fresh_root)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not fresh_root.exists(), "a missing --input must not create DATA_ROOT"
    assert cli_main(["stats", str(tmp_path / "root"), "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["stages"][0]["samples"] == 4 and stats["stages"][0]["caption_words"]["mean"] == 6


def test_concurrent_writer_refused(tmp_path: Path) -> None:
    from data_tools.manifest import writer_lock

    table = make_table_input(tmp_path / "in", 2)
    with writer_lock(tmp_path / "root", "test"), pytest.raises(RuntimeError, match="another ingest"):
        ingest(table, "table", tmp_path / "root")
    assert ingest(table, "table", tmp_path / "root").count == 2


# ------------------------------------------------------------------ img2dataset tars are read lazily
def _big_img2dataset_tar(folder: Path, n: int, pad: int) -> Path:
    """``n`` pairs whose JPEGs carry ``pad`` bytes after the end-of-image marker (still decodable)."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 7 % 256, 40, 90)).save(buf, format="JPEG")
            for name, data in (
                (f"{i:09d}.jpg", buf.getvalue() + b"\0" * pad),
                (f"{i:09d}.txt", f"big pair {i}".encode()),
                (f"{i:09d}.json", json.dumps({"url": f"https://example.com/{i}"}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return folder


def test_img2dataset_tar_enumeration_holds_no_image_bytes(tmp_path: Path) -> None:
    """Memory of the enumeration does not grow with the crawl: records reference tar members."""
    import tracemalloc

    src = _big_img2dataset_tar(tmp_path / "crawl", 24, pad=512 * 1024)  # ~12 MiB of images
    input_bytes = (src / "00000.tar").stat().st_size
    tracemalloc.start()
    try:
        records = ingest_mod.enumerate_records(src, "img2dataset")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == 24
    assert all(r.image_bytes is None and r.image_member is not None for r in records)
    assert peak < input_bytes / 20, f"enumeration peaked at {peak} B for {input_bytes} B of input"
    res1 = ingest(src, "img2dataset", tmp_path / "r1", shard_size=10, workers=1)
    res2 = ingest(src, "img2dataset", tmp_path / "r2", shard_size=10, workers=2)
    assert res1.count == res2.count == 24 and res1.drops == {}
    assert tree_bytes(tmp_path / "r1") == tree_bytes(tmp_path / "r2")


def test_img2dataset_truncated_tar_keeps_pairs_before(tmp_path: Path) -> None:
    src = make_img2dataset_input(tmp_path / "crawl", 6)
    tar = src / "00000.tar"
    with tarfile.open(tar) as tf:
        cut = tf.getmember("000000004.jpg")
    tar.write_bytes(tar.read_bytes()[: cut.offset_data + cut.size // 2])  # pair 4's JPEG is cut in half
    records = ingest_mod.enumerate_records(src, "img2dataset")
    assert [r.source for r in records] == [f"00000.tar/00000000{i}" for i in range(4)]
    assert ingest(src, "img2dataset", tmp_path / "root").count == 4


def test_resume_detects_changed_tar_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images are not read for the fingerprint, but a member that changed size is still noticed."""
    src = make_img2dataset_input(tmp_path / "crawl", 12)

    def crash(path: Path, samples: list) -> str:
        raise RuntimeError("crash")

    monkeypatch.setattr(ingest_mod, "_write_shard", crash)
    with pytest.raises(RuntimeError):
        ingest(src, "img2dataset", tmp_path / "root", shard_size=5)
    monkeypatch.undo()
    make_img2dataset_input(tmp_path / "crawl", 12, seed=9)  # same names, other pictures
    with pytest.raises(ValueError, match="different input or options"):
        ingest(src, "img2dataset", tmp_path / "root", shard_size=5)


# ------------------------------------------------------------------------------- repair is crash-safe
def test_repair_crash_before_replace_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_tools import validate as validate_mod

    root = tmp_path / "root"
    ingest(make_table_input(tmp_path / "in", 10), "table", root, shard_size=5)
    s0 = root / "shards/stage_01/000000.tar"
    with tarfile.open(s0) as tf:
        jpg = tf.getmember(shard_keys(s0)[1] + ".jpg")
    flip_byte(s0, jpg.offset_data + jpg.size // 2)

    def crash(path: Path, samples: list) -> str:
        raise KeyboardInterrupt("crash between quarantine and replace")

    monkeypatch.setattr(validate_mod, "write_tar", crash)
    with pytest.raises(KeyboardInterrupt):
        validate(root, repair=True)
    assert s0.exists(), "the shard must stay under its name until its replacement is in place"
    assert (root / "quarantine/stage_01/000000.tar").read_bytes() == s0.read_bytes()
    monkeypatch.undo()
    report = validate(root, repair=True)
    assert report.ok and report.lost == 1, report.render()  # only the damaged sample, not the shard
    assert len(shard_keys(s0)) == 4 and validate(root).ok


def test_repair_rebuilds_stage_hashes(tmp_path: Path) -> None:
    """A sample dropped by --repair no longer counts as a duplicate when its image comes back."""
    root = tmp_path / "root"
    table = make_table_input(tmp_path / "a", 10, seed=1)
    ingest(table, "table", root, shard_size=5)
    s0 = root / "shards/stage_01/000000.tar"
    key = shard_keys(s0)[2]
    with tarfile.open(s0) as tf:
        meta = json.loads(tf.extractfile(key + ".json").read())
        jpg = tf.getmember(key + ".jpg")
    flip_byte(s0, jpg.offset_data + jpg.size // 2)
    hashes = root / "shards/stage_01/hashes.txt"
    assert meta["pixel_sha256"] in hashes.read_text().split()
    assert validate(root, repair=True).ok
    assert meta["pixel_sha256"] not in hashes.read_text().split()
    assert len(hashes.read_text().split()) == 9
    assert load_manifest(root)["dedupe"]["unique"] == 9
    # the dropped picture comes back in stage 2: kept, not a duplicate
    row = json.loads(table.read_text().splitlines()[int(meta["source"].split("#")[1])])
    again = tmp_path / "b" / "pairs.jsonl"
    again.parent.mkdir()
    again.write_text(json.dumps({"caption": "back again", "image": str(tmp_path / "a" / row["image"])}) + "\n")
    res = ingest(again, "table", root)
    assert res.count == 1 and res.drops == {}
