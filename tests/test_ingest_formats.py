"""Ingest reads the formats users have (issue #19 item 1): open_clip's CSV/TSV (``--separator``, sniffed),
``--path-base``, parquet with image bytes or paths, img2dataset's parquet and webdataset outputs, and
webdataset tar folders. The img2dataset folders here are built by hand to mirror its output exactly (its
1.47.0 writer: same file names, column names and types); ``tests/test_img2dataset_crawl.py`` runs the
real one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_tools.cli import main as cli_main
from data_tools.ingest import IngestFailed, ingest
from data_tools.inputs import enumerate_records, parse_separator, resolve_format
from data_tools.manifest import load_manifest
from tests.helpers import encode_image, stage_samples

pytestmark = pytest.mark.usefixtures("restore_root_logging")


def picture(folder: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A small RGB image file (its size tells which file a pair came from)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", size, colour).save(path)
    return path


def jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    return encode_image(Image.new("RGB", size, colour), "JPEG", quality=95)


def sizes(root: Path, stage: int = 1) -> dict[str, tuple[int, int]]:
    """source id -> original (width, height) of every kept pair."""
    return {k: (s["meta"]["orig_width"], s["meta"]["orig_height"]) for k, s in stage_samples(root, stage).items()}


def captions(root: Path, stage: int = 1) -> dict[str, str]:
    return {k: s["txt"] for k, s in stage_samples(root, stage).items()}


# --------------------------------------------------------------------------------- open_clip CSV/TSV
def open_clip_csv(folder: Path, rows: list[str], name: str = "train.csv") -> Path:
    """open_clip's training CSV: a .csv that is TAB-separated, columns filepath and title."""
    for i in range(3):
        picture(folder / "img", f"{i}.jpg", (20 + i, 20))
    path = folder / name
    path.write_text("filepath\ttitle\n" + "".join(r + "\n" for r in rows))
    return path


def test_open_clip_csv_is_sniffed_as_tab_and_keeps_commas(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = open_clip_csv(
        tmp_path / "in",
        ["img/0.jpg\ta dog, a cat, and a bird", 'img/1.jpg\ta "quoted" word, then more', "img/2.jpg\tplain"],
    )
    with caplog.at_level(logging.INFO, logger="data_tools.inputs"):
        res = ingest(table, "table", tmp_path / "root")  # default columns: open_clip's title/filepath used
    assert (res.count, res.drops) == (3, {})
    assert "train.csv: separator tab (auto" in caplog.text
    assert captions(tmp_path / "root") == {
        "train.csv#0": "a dog, a cat, and a bird",
        "train.csv#1": 'a "quoted" word, then more',
        "train.csv#2": "plain",
    }
    res = ingest(table, "table", tmp_path / "root2", caption_col="title", image_col="filepath")  # explicit: same
    assert res.count == 3


def test_a_row_with_more_fields_than_the_header_is_a_bad_row(tmp_path: Path) -> None:
    table = open_clip_csv(tmp_path / "in", ["img/0.jpg\tfine", "img/1.jpg\ta tab\tinside", "img/2.jpg\tfine too"])
    records = enumerate_records(table, "table")
    assert [r.drop[0] if r.drop else None for r in records] == [None, "bad_row", None]
    assert "line 3: 3 fields, the header has 2 (a tab in an unquoted value?" in records[1].drop[1]
    res = ingest(table, "table", tmp_path / "root")
    assert (res.count, res.drops) == (2, {"bad_row": 1})
    # comma-separated: an unquoted comma is the same problem; a quoted one is text
    picture(tmp_path / "c", "a.png", (20, 20))
    (tmp_path / "c/t.csv").write_text('image,caption\na.png,"a dog, a cat"\na.png,a dog, a cat\n')
    assert [r.drop[0] if r.drop else r.caption for r in enumerate_records(tmp_path / "c/t.csv", "table")] == [
        "a dog, a cat",
        "bad_row",
    ]


def test_separator_explicit_sniffed_and_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    picture(tmp_path, "a.png", (20, 20))
    (tmp_path / "semi.csv").write_text("image;caption\na.png;a dog, on grass\n")
    (tmp_path / "pipe.tsv").write_text("text|path\na dog\t on grass|a.png\n")
    with caplog.at_level(logging.INFO, logger="data_tools.inputs"):
        (rec,) = enumerate_records(tmp_path / "semi.csv", "table")
        assert rec.caption == "a dog, on grass"
        (rec,) = enumerate_records(tmp_path / "pipe.tsv", "table", caption_col="text", image_col="path")
        assert (rec.caption, Path(rec.image_path).name) == ("a dog on grass", "a.png")
    assert "semi.csv: separator semicolon (auto" in caplog.text and "pipe.tsv: separator pipe (auto" in caplog.text
    (rec,) = enumerate_records(tmp_path / "semi.csv", "table", separator=";")
    assert rec.caption == "a dog, on grass"
    # forced onto the wrong separator: the columns as split are named, with the fix
    with pytest.raises(ValueError, match=r"columns \['image;caption'\] \(split on comma\) lack .* or --separator"):
        enumerate_records(tmp_path / "semi.csv", "table", separator=",")
    assert [parse_separator(s) for s in ("auto", "tab", "\\t", "\t", ",", "comma", "|", "pipe", ";")] == [
        "auto", "\t", "\t", "\t", ",", ",", "|", "|", ";",
    ]  # fmt: skip
    for bad in ("ab", "", '"', "x", "\n"):
        with pytest.raises(ValueError, match="is not a field separator"):
            parse_separator(bad)


def test_separator_and_path_base_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = open_clip_csv(tmp_path / "in", ["img/0.jpg\ta dog"])
    base = ["ingest", "--input", str(table), "--data-root", str(tmp_path / "root")]
    for extra, expect in (
        (["--separator", "ab"], "is not a field separator"),
        (["--path-base", str(tmp_path / "nope")], "is not a directory; use table"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main([*base, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expect in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error:") or "usage" in err
    assert not (tmp_path / "root").exists()


def test_path_base_table_cwd_and_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same relative path, three folders: each choice reads its own file (told apart by size)."""
    table = tmp_path / "tables" / "train.csv"
    picture(tmp_path / "tables" / "img", "a.jpg", (20, 20))  # next to the table
    picture(tmp_path / "work" / "img", "a.jpg", (24, 24))  # the working directory (open_clip)
    picture(tmp_path / "media" / "img", "a.jpg", (28, 28))  # a folder given
    table.write_text("filepath\ttitle\nimg/a.jpg\ta dog\n")
    monkeypatch.chdir(tmp_path / "work")
    got, shas = {}, {}
    for base in ("table", "cwd", str(tmp_path / "media")):
        res = ingest(table, "table", tmp_path / f"root_{len(got)}", path_base=base)
        got[base] = sizes(tmp_path / f"root_{len(got)}")["train.csv#0"]
        shas[base] = res.input_sha256
    assert list(got.values()) == [(20, 20), (24, 24), (28, 28)]
    assert len(set(shas.values())) == 3  # the records differ, so does the input's fingerprint
    # the CLI: --path-base cwd; an absolute path ignores the base
    root = tmp_path / "root_cli"
    assert cli_main(["ingest", "--input", str(table), "--data-root", str(root), "--path-base", "cwd"]) == 0
    assert sizes(root)["train.csv#0"] == (24, 24)
    table.write_text(f"filepath\ttitle\n{tmp_path / 'media/img/a.jpg'}\ta dog\n")
    assert {r.image_path for r in enumerate_records(table, "table", path_base="cwd")} == {
        str(tmp_path / "media/img/a.jpg")
    }


def test_the_separator_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """A separator that changes which records come out changes input_sha256 (a re-run is not a no-op)."""
    picture(tmp_path, "a.png", (20, 20))
    picture(tmp_path, "b.png", (22, 20))
    table = tmp_path / "t.csv"  # the header has both columns split on tab and on comma (auto: tab wins a tie)
    table.write_text("image\tcaption\t,image,caption\na.png\ttab dog\t,b.png,comma dog\n")
    assert [r.caption for r in enumerate_records(table, "table")] == ["tab dog"]
    tab = ingest(table, "table", tmp_path / "root")
    comma = ingest(table, "table", tmp_path / "root", separator=",")
    assert tab.input_sha256 != comma.input_sha256 and not comma.already_ingested
    assert captions(tmp_path / "root", 2) == {"t.csv#0": "comma dog"}
    assert ingest(table, "table", tmp_path / "root", separator="tab").already_ingested


# --------------------------------------------------------------------------------------------- parquet
pa = pytest.importorskip("pyarrow", reason="parquet input needs PyPI pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    """A binary column is the image (read by the workers, row group by row group); nulls are missing."""
    images = [jpeg((16 + i, 16), (10 * i, 100, 200)) for i in range(7)]
    images[3] = None
    table = pa.table(
        {
            "caption": [f"pair {i}" for i in range(7)],
            "jpg": pa.array(images, pa.binary()),
            "url": [f"https://example.com/{i}.jpg" for i in range(7)],
        }
    )
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=3)  # 3 row groups
    records = enumerate_records(tmp_path / "pairs.parquet", "table")  # no "image" column: the binary jpg one
    assert [r.image_cell[1:] for r in records] == [(g, r, "jpg") for g in range(3) for r in range(3)][:7]
    assert all(r.image_bytes is None for r in records)  # nothing of the images is held by the records
    one = ingest(tmp_path / "pairs.parquet", "table", tmp_path / "r1", workers=1)
    two = ingest(tmp_path / "pairs.parquet", "table", tmp_path / "r2", workers=2, image_col="jpg")
    assert (one.count, one.drops) == (6, {"missing_file": 1})
    assert one.input_sha256 == two.input_sha256 and sizes(tmp_path / "r1") == sizes(tmp_path / "r2")
    assert sizes(tmp_path / "r1") == {f"pairs.parquet#{i}": (16 + i, 16) for i in range(7) if i != 3}
    assert stage_samples(tmp_path / "r1", 1)["pairs.parquet#5"]["meta"]["url"] == "https://example.com/5.jpg"


def test_parquet_with_a_path_column_works_as_before(tmp_path: Path) -> None:
    picture(tmp_path / "img", "a.png", (20, 20))
    picture(tmp_path / "img", "b.png", (22, 20))
    pq.write_table(pa.table({"caption": ["a", "b"], "image": ["img/a.png", "img/b.png"]}), tmp_path / "strings.parquet")
    pq.write_table(pa.table({"caption": ["a", "b"], "image": [b"img/a.png", b"img/b.png"]}), tmp_path / "bin.parquet")
    for name in ("strings.parquet", "bin.parquet"):  # a binary column of paths stays paths (POSIX bytes)
        records = enumerate_records(tmp_path / name, "table")
        assert [Path(r.image_path).name for r in records] == ["a.png", "b.png"]
        assert not any(r.image_cell for r in records)
    assert ingest(tmp_path / "bin.parquet", "table", tmp_path / "root").count == 2


def test_a_damaged_image_cell_is_one_drop(tmp_path: Path) -> None:
    cells = [jpeg((20, 20), (1, 2, 3)), b"\x00not an image", b"", jpeg((21, 20), (9, 9, 9))]
    pq.write_table(pa.table({"caption": list("abcd"), "jpg": pa.array(cells, pa.binary())}), tmp_path / "t.parquet")
    res = ingest(tmp_path / "t.parquet", "table", tmp_path / "root")
    assert res.count == 2 and sum(res.drops.values()) == 2, res.drops


# ------------------------------------------------------------------------ img2dataset output, mirrored
# img2dataset 1.47.0 (downloader.py + writer.py): the input's columns (url, caption: string), then these
# (exif with --extract_exif, sha256 with --compute_hash, both on by default); parquet output adds the image
I2D_META = [
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]
I2D_SCHEMA = pa.schema([("caption", pa.string()), ("url", pa.string()), *I2D_META])


def i2d_rows(n_ok: int, failed: dict[int, tuple[str, str]], shard: int = 0) -> list[dict[str, Any]]:
    """img2dataset's samples in the order its threads finish them (not key order), with their jpg bytes."""
    rows = []
    for i in range(n_ok + len(failed)):
        key = f"{i:09d}"
        row: dict[str, Any] = {"caption": f"a crawled picture {i}", "url": f"http://127.0.0.1:8000/{i}.jpg", "key": key}
        if i in failed:
            status, message = failed[i]
            row |= {"status": status, "error_message": message, "jpg": None}
            row |= dict.fromkeys(["width", "height", "original_width", "original_height", "exif", "sha256"])
        else:
            data = jpeg((64, 64), (40 * i % 256, 80 + 40 * shard, 160))
            row |= {"status": "success", "error_message": None, "jpg": data, "exif": "{}", "sha256": "0" * 64}
            row |= {"width": 64, "height": 64, "original_width": 64, "original_height": 40 + i}
        rows.append(row)
    return rows[::-1]  # unsorted, as its imap_unordered writes them


def i2d_stats(folder: Path, shard: str, rows: list[dict[str, Any]]) -> None:
    ok = sum(r["status"] == "success" for r in rows)
    stats = {"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok, "failed_to_resize": 0}
    (folder / f"{shard}_stats.json").write_text(json.dumps(stats, indent=4))


def make_i2d_parquet_output(folder: Path, shards: dict[str, list[dict[str, Any]]]) -> Path:
    """``img2dataset --output_format parquet``: ``00000.parquet`` (the image in ``jpg``) + ``00000_stats.json``."""
    folder.mkdir(parents=True)
    schema = I2D_SCHEMA.append(pa.field("jpg", pa.binary()))
    for shard, rows in shards.items():
        with pq.ParquetWriter(folder / f"{shard}.parquet", schema) as writer:
            for start in range(0, len(rows), 100):  # its BufferedParquetWriter: a row group per 100 samples
                chunk = rows[start : start + 100]
                writer.write_table(pa.Table.from_pydict({k: [r[k] for r in chunk] for k in schema.names}, schema))
        i2d_stats(folder, shard, rows)
    return folder


def make_i2d_webdataset_output(folder: Path, shards: dict[str, list[dict[str, Any]]]) -> Path:
    """``img2dataset --output_format webdataset``: ``00000.tar`` (``000000000.jpg/.txt/.json``, successes
    only), ``00000.parquet`` (metadata of every sample, no image) and ``00000_stats.json``."""
    import webdataset as wds

    folder.mkdir(parents=True)
    for shard, rows in shards.items():
        with open(folder / f"{shard}.tar", "wb") as fh, wds.TarWriter(fh) as tar:
            for r in rows:
                if r["status"] == "success":
                    meta = {k: r[k] for k in I2D_SCHEMA.names}
                    tar.write({"__key__": r["key"], "jpg": r["jpg"], "txt": r["caption"], "json": json.dumps(meta)})
        meta_rows = pa.Table.from_pydict({k: [r[k] for r in rows] for k in I2D_SCHEMA.names}, I2D_SCHEMA)
        pq.write_table(meta_rows, folder / f"{shard}.parquet")
        i2d_stats(folder, shard, rows)
    return folder


def test_img2dataset_parquet_output(tmp_path: Path) -> None:
    failed = {
        2: ("failed_to_download", "HTTP Error 404: File not found"),
        5: ("failed_to_resize", "Image decoding error"),
    }
    shards = {"00000": i2d_rows(5, failed), "00001": i2d_rows(2, {}, shard=1)}
    out = make_i2d_parquet_output(tmp_path / "crawl", shards)
    assert resolve_format(out, "auto") == resolve_format(out / "00000.parquet", "auto") == "img2dataset"
    records = enumerate_records(out, "img2dataset")
    assert [r.source for r in records] == [f"00000.parquet/{i:09d}" for i in range(7)] + [
        f"00001.parquet/{i:09d}" for i in range(2)
    ]  # sorted by key, as the pairs of its tars
    assert records[2].drop == ("download_failed", "failed_to_download: HTTP Error 404: File not found")
    res = ingest(out, "auto", tmp_path / "root")
    assert (res.count, res.drops) == (7, {"download_failed": 2})
    kept = stage_samples(tmp_path / "root", 1)
    assert kept["00000.parquet/000000003"]["txt"] == "a crawled picture 3"
    assert kept["00000.parquet/000000003"]["meta"]["url"] == "http://127.0.0.1:8000/3.jpg"
    assert kept["00000.parquet/000000003"]["meta"]["orig_width"] == 64
    (entry,) = load_manifest(tmp_path / "root")["stages"]
    assert entry["sources"][0]["format"] == "img2dataset" and entry["drops"] == {"download_failed": 2}
    # --format table on one of its files: the same pairs (ids by row), the failed rows dropped the same way
    res = ingest(out / "00000.parquet", "table", tmp_path / "root_t", image_col="jpg")
    assert (res.count, res.drops) == (5, {"download_failed": 2})


def test_img2dataset_output_without_pairs_never_appends_a_stage(tmp_path: Path) -> None:
    empty = make_i2d_parquet_output(tmp_path / "empty", {"00000": []})
    with pytest.raises(IngestFailed, match="the input has no pairs"):
        ingest(empty, "img2dataset", tmp_path / "root")
    failed = make_i2d_parquet_output(tmp_path / "failed", {"00000": i2d_rows(0, {0: ("failed_to_download", "x")})})
    with pytest.raises(IngestFailed, match="0 of 1 pairs kept, dropped download_failed=1"):
        ingest(failed, "img2dataset", tmp_path / "root")
    assert load_manifest(tmp_path / "root")["stages"] == []
    assert not (tmp_path / "root/shards/stage_01").exists() and not (tmp_path / "root/.ingest").exists()
    # the CLI: exit 1, one line
    assert cli_main(["ingest", "--input", str(empty), "--data-root", str(tmp_path / "root")]) == 1


def test_img2dataset_metadata_only_parquet_is_refused(tmp_path: Path) -> None:
    """Its files/webdataset outputs write metadata parquet files: without the images there is nothing to read."""
    out = make_i2d_webdataset_output(tmp_path / "crawl", {"00000": i2d_rows(2, {})})
    (out / "00000.tar").unlink()
    with pytest.raises(ValueError, match=r"its 1 \*.parquet files hold only metadata"):
        enumerate_records(out, "img2dataset")


def test_img2dataset_webdataset_output(tmp_path: Path) -> None:
    shards = {"00000": i2d_rows(4, {1: ("failed_to_download", "timeout")}), "00001": i2d_rows(3, {}, shard=1)}
    out = make_i2d_webdataset_output(tmp_path / "crawl", shards)
    assert resolve_format(out, "auto") == "img2dataset"
    res = ingest(out, "auto", tmp_path / "root")
    # the tars hold the successes; the failure is in the metadata parquet beside: counted, as in the parquet output
    assert (res.count, res.drops, res.records) == (7, {"download_failed": 1}, 8)
    records = enumerate_records(out, "img2dataset")
    assert records[1].source == "00000.tar/000000001" and records[1].drop == (
        "download_failed",
        "failed_to_download: timeout",
    )
    kept = stage_samples(tmp_path / "root", 1)
    assert sorted(kept)[:2] == ["00000.tar/000000000", "00000.tar/000000002"]
    (out / "00000.parquet").unlink()  # a tar alone (webdataset output without its metadata): what it holds
    assert [r.drop for r in enumerate_records(out, "webdataset")] == [None] * 7
    assert kept["00001.tar/000000002"]["meta"]["url"] == "http://127.0.0.1:8000/2.jpg"


# ------------------------------------------------------------------------------------ webdataset tars
def write_tar(path: Path, members: dict[str, bytes]) -> None:
    import tarfile
    from io import BytesIO

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, BytesIO(data))


def test_webdataset_folders_nested_shards_and_keys(tmp_path: Path) -> None:
    """Shards {00000..00002}.tar in sub-folders; jpg/jpeg/png/webp images; webdataset's base_plus_ext keys."""
    src = tmp_path / "wds"
    png = encode_image(Image.new("RGB", (30, 20), (1, 200, 3)), "PNG")
    webp = encode_image(Image.new("RGB", (31, 20), (200, 1, 3)), "WEBP", lossless=True)
    for s in range(3):
        write_tar(src / "part-a" / f"{s:05d}.tar", {f"{s}a.jpg": jpeg((20 + s, 20), (s, 50, 50)), f"{s}a.txt": b"jpg"})
    write_tar(
        src / "part-b" / "00000.tar",
        {
            "v1.2/cat.png": png,  # a dot in the folder: the key is "v1.2/cat"
            "v1.2/cat.txt": b"png in a dotted folder",
            "dog.webp": webp,
            "dog.txt": b"webp",
            "emu.JPEG": jpeg((22, 22), (5, 5, 5)),  # extensions are lower-cased
            "emu.txt": b"jpeg",
            "README": b"no extension: not a sample",
            "fox.seg.png": png,  # extension "seg.png": not an image
            "fox.txt": b"a caption without an image",
        },
    )
    assert resolve_format(src, "webdataset") == "img2dataset" == resolve_format(src, "auto")
    records = {r.source: r for r in enumerate_records(src, "webdataset")}
    assert sorted(records) == [
        "part-a/00000.tar/0a", "part-a/00001.tar/1a", "part-a/00002.tar/2a",
        "part-b/00000.tar/dog", "part-b/00000.tar/emu", "part-b/00000.tar/fox", "part-b/00000.tar/v1.2/cat",
    ]  # fmt: skip
    res = ingest(src, "webdataset", tmp_path / "root")
    assert (res.count, res.drops) == (6, {"missing_file": 1})  # fox: a caption, no image
    got = captions(tmp_path / "root")
    assert got["part-b/00000.tar/v1.2/cat"] == "png in a dotted folder" and got["part-b/00000.tar/emu"] == "jpeg"
    # --image-col / --caption-col pick members by extension, as webdataset's to_tuple("png;jpg", "txt")
    only_png = enumerate_records(src, "webdataset", image_col="png")
    assert sum(r.image_member is not None for r in only_png) == 1


def test_format_auto_refuses_what_it_cannot_tell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = tmp_path / "both"
    write_tar(both / "00000.tar", {"a.jpg": jpeg((20, 20), (1, 1, 1)), "a.txt": b"x"})
    (both / "t.csv").write_text("caption,image\nx,a.jpg\n")
    with pytest.raises(ValueError, match=r"holds both \*.tar shards and tables"):
        resolve_format(both, "auto")
    assert resolve_format(both, "table") == "table"
    (tmp_path / "notes.txt").write_text("x")
    rc = cli_main(["ingest", "--input", str(tmp_path / "notes.txt"), "--data-root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot tell what" in err and "Traceback" not in err
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"no \*.tar shards in it"):
        resolve_format(tmp_path / "empty_dir", "webdataset")
    with pytest.raises(ValueError, match="--separator/--path-base apply to tables"):
        enumerate_records(both / "00000.tar", "img2dataset", separator=",")
