"""Ingest bad input, round 2 (issue #14): no row is silently corrupted, and none stops, hangs or aborts an ingest.

* pixels stay faithful in every mode Pillow opens (16/32-bit, float, transparency, CMYK, orientation,
  animations): each shard image is decoded and compared with an 8-bit RGB reference built here;
* a caption is the exact source text, or the row is counted under a reason (never ``str()``-ed);
* a FIFO, a directory, a NUL byte in a path, a 10 MB CSV field, a JSONL array line, a lone surrogate,
  an invalid UTF-8 byte: the row is counted, the rest of the input is kept, no journal is left;
* a re-run of an ingested input is a no-op naming the stage; a run that keeps nothing exits 1 and
  appends nothing; a truncated manifest is an error naming the file; empty stages are refused/repaired.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as cli_main
from data_tools.imaging import ImageOptions
from data_tools.ingest import IngestFailed, ingest
from data_tools.manifest import check_no_empty_stages, empty_stages, load_manifest, save_manifest
from data_tools.validate import validate
from tests.helpers import bounded, encode_image, grey_rgb, stage_samples

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # = image_size: shard images are the source pixels, only JPEG-encoded
OPTS = ImageOptions(image_size=SIZE, jpeg_quality=95)


# ---------------------------------------------------------------------------------------- helpers
def samples(root: Path, stage: int = 1) -> dict[str, dict[str, Any]]:
    """Every sample of a stage by its input source id: {"txt": str, "rgb": (H, W, 3) uint8, "meta": dict}."""
    return {
        src: {**s, "rgb": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))}
        for src, s in stage_samples(root, stage).items()
    }


def write_jsonl(folder: Path, rows: list[Any], name: str = "pairs.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good_png(path: Path, seed: int) -> str:
    """A small smooth picture (distinct per seed); returns the file name."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(5, 5, 3), dtype=np.uint8)
    Image.fromarray(base).resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(path)
    return path.name


def no_trace_journal(root: Path) -> None:
    """No pending journal: the next ingest is not blocked."""
    assert not (root / ".ingest").exists(), sorted(p.name for p in (root / ".ingest").rglob("*"))


def no_trace(root: Path, stage: int = 1) -> None:
    """Nothing of a failed or refused stage is left: no journal, no stage dir."""
    assert not (root / ".ingest").exists(), sorted(p.name for p in (root / ".ingest").rglob("*"))
    assert not (root / f"shards/stage_{stage:02d}").exists()


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------- pixel fidelity
def _grad16(k: int) -> np.ndarray:
    """A smooth 16-bit picture over most of the range (1000..59900 + 257k), distinct per case ``k`` < 20."""
    assert k < 20
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return (x * 1700 + y * 200 + 1000 + 257 * k).astype(np.uint16)


def _colour(k: int) -> np.ndarray:
    """A smooth, asymmetric RGB picture (R grows to the right, G downwards): a rotation shows."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 7 + 20, y * 7 + 10 + k, 255 - x * 3 - y * 3], axis=-1).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex


def _case_i16_png(k: int) -> tuple[bytes, str, np.ndarray]:
    a = _grad16(k)
    return encode_image(Image.fromarray(a), "PNG"), ".png", grey_rgb(a / 257)


def _case_i16b_tiff(k: int) -> tuple[bytes, str, np.ndarray]:
    a = _grad16(k)
    big_endian = Image.frombytes("I;16B", (SIZE, SIZE), a.astype(">u2").tobytes())  # convert() would clip
    return encode_image(big_endian, "TIFF"), ".tiff", grey_rgb(a / 257)


def _case_i_pgm(k: int) -> tuple[bytes, str, np.ndarray]:  # 16-bit PGM opens as mode I
    a = _grad16(k)
    return encode_image(Image.fromarray(a.astype(np.int32)), "PPM"), ".pgm", grey_rgb(a / 257)


def _case_i32_tiff(k: int) -> tuple[bytes, str, np.ndarray]:  # beyond 16 bits: stretched from min to max
    a = _grad16(k).astype(np.int64) * 20_000 - 100_000_000
    lo, hi = a.min(), a.max()
    return encode_image(Image.fromarray(a.astype(np.int32)), "TIFF"), ".tiff", grey_rgb((a - lo) * 255 / (hi - lo))


def _case_f_tiff(k: int) -> tuple[bytes, str, np.ndarray]:  # float in [0, 1]
    a = _grad16(k).astype(np.float32) / 65535
    return encode_image(Image.fromarray(a), "TIFF"), ".tiff", grey_rgb(a * 255)


def _case_i16_trns(k: int) -> tuple[bytes, str, np.ndarray]:  # a 16-bit grey tRNS key: those pixels are transparent
    a = _grad16(k)
    a[:8, :8] = 1234
    ref = grey_rgb(a / 257)
    ref[:8, :8] = 255
    return encode_image(Image.fromarray(a), "PNG", transparency=1234), ".png", ref


def _case_palette_trns(k: int) -> tuple[bytes, str, np.ndarray]:
    """Flat palette blocks on 16-px boundaries (JPEG-friendly); index 3 is transparent (the left half)."""
    idx = np.zeros((SIZE, SIZE), np.uint8)
    idx[16:, 16:] = 1
    idx[:16, 16:] = 2
    idx[:, :16] = 3
    palette = [200, 40 + k, 60, 30, 160, 90, 70, 80, 220, 0, 0, 0]
    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette)
    ref = np.array(palette, np.uint8).reshape(-1, 3)[idx]
    ref[:, :16] = 255
    return encode_image(pal, "PNG", transparency=3), ".png", ref


def _case_la(k: int) -> tuple[bytes, str, np.ndarray]:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    lum = (x * 6 + 30 + k).astype(np.uint8)
    alpha = (y * 8).clip(0, 255).astype(np.uint8)
    img = Image.merge("LA", (Image.fromarray(lum), Image.fromarray(alpha)))
    return encode_image(img, "PNG"), ".png", _on_white(grey_rgb(lum), alpha)


def _cmyk(k: int) -> tuple[Image.Image, np.ndarray]:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    c = np.stack([x * 5, y * 5 + k, 200 - x * 3, 40 + y], axis=-1).astype(np.uint8)
    k = c[..., 3:4].astype(np.float64)
    return Image.fromarray(c, "CMYK"), np.rint((255 - c[..., :3]) * (255 - k) / 255).astype(np.uint8)


def _case_cmyk_jpeg(k: int) -> tuple[bytes, str, np.ndarray]:
    img, ref = _cmyk(k)
    return encode_image(img, "JPEG", quality=97), ".jpg", ref


def _case_cmyk_tiff(k: int) -> tuple[bytes, str, np.ndarray]:
    img, ref = _cmyk(k)
    return encode_image(img, "TIFF"), ".tiff", ref


def _case_one_bit(k: int) -> tuple[bytes, str, np.ndarray]:
    a = np.zeros((SIZE, SIZE), bool)
    a[:, SIZE // 2 :] = True
    a[: k % SIZE, :4] = True
    return encode_image(Image.fromarray(a), "PNG"), ".png", grey_rgb(a * 255.0)


_XMP_ROTATE_CW = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _orientation(fmt: str, suffix: str, tag: str = "exif") -> Callable[[int], tuple[bytes, str, np.ndarray]]:
    def case(k: int) -> tuple[bytes, str, np.ndarray]:
        stored = _colour(k)  # orientation 6: displayed rotated 90 degrees clockwise
        kw: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {"quality": 97} if fmt == "JPEG" else {}
        kw.update(exif=_exif(6)) if tag == "exif" else kw.update(xmp=_XMP_ROTATE_CW)
        return encode_image(Image.fromarray(stored), fmt, **kw), suffix, np.rot90(stored, -1)

    return case


def _animated(fmt: str, suffix: str) -> Callable[[int], tuple[bytes, str, np.ndarray]]:
    def case(k: int) -> tuple[bytes, str, np.ndarray]:
        frames = [Image.new("RGB", (SIZE, SIZE), c) for c in ((200, 30 + k, 40), (20, 210, 60), (10, 20, 230))]
        kw = {"lossless": True} if fmt == "WEBP" else {}
        data = encode_image(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        return data, suffix, np.asarray(frames[0])

    return case


# case -> builder; "old" marks what the code before issue #14 got wrong (the others guard against regressions)
PIXEL_CASES: dict[str, Callable[[int], tuple[bytes, str, np.ndarray]]] = {
    "png_I;16 (old)": _case_i16_png,
    "tiff_I;16B (old)": _case_i16b_tiff,
    "pgm_I (old)": _case_i_pgm,
    "tiff_I32 (old)": _case_i32_tiff,
    "tiff_F (old)": _case_f_tiff,
    "png_I;16_tRNS (old)": _case_i16_trns,
    "jpeg_xmp_orientation (old)": _orientation("JPEG", ".jpg", "xmp"),
    "webp_xmp_orientation (old)": _orientation("WEBP", ".webp", "xmp"),
    "png_P_transparency": _case_palette_trns,
    "png_LA": _case_la,
    "jpeg_CMYK": _case_cmyk_jpeg,
    "tiff_CMYK": _case_cmyk_tiff,
    "png_1bit": _case_one_bit,
    "jpeg_exif_orientation": _orientation("JPEG", ".jpg"),
    "png_exif_orientation": _orientation("PNG", ".png"),
    "webp_exif_orientation": _orientation("WEBP", ".webp"),
    "tiff_orientation_tag": _orientation("TIFF", ".tiff"),
    "gif_animated": _animated("GIF", ".gif"),
    "webp_animated": _animated("WEBP", ".webp"),
}


@pytest.fixture(scope="module")
def pixel_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """One ingest of one picture per case; returns the samples and the references by source id."""
    tmp = tmp_path_factory.mktemp("pixels")
    rows, refs = [], {}
    for i, (name, build) in enumerate(PIXEL_CASES.items()):
        data, suffix, ref = build(i)
        (tmp / f"case{i}{suffix}").write_bytes(data)
        rows.append({"caption": f"pixel case {name}", "image": f"case{i}{suffix}"})
        refs[f"pairs.jsonl#{i}"] = ref
    res = ingest(write_jsonl(tmp, rows), "table", tmp / "root", opts=OPTS)
    assert res.drops == {} and res.count == len(PIXEL_CASES)
    return samples(tmp / "root"), refs


@pytest.mark.parametrize("case", list(PIXEL_CASES))
def test_pixels_faithful_in_every_mode(
    pixel_corpus: tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]], case: str
) -> None:
    got, refs = pixel_corpus
    source = f"pairs.jsonl#{list(PIXEL_CASES).index(case)}"
    sample, ref = got[source], refs[source]
    assert sample["txt"] == f"pixel case {case}"
    assert sample["rgb"].shape == ref.shape, f"{case}: shape {sample['rgb'].shape}, expected {ref.shape}"
    delta = np.abs(sample["rgb"].astype(np.int64) - ref.astype(np.int64)).mean()
    assert delta < 3.0, f"{case}: mean |delta| {delta:.1f} levels of 255 against the 8-bit reference"


# -------------------------------------------------------------------------------------- captions
def test_captions_are_exact_text_or_dropped_with_a_reason(tmp_path: Path) -> None:
    img = tmp_path / "in"
    img.mkdir()
    rows: list[Any] = []
    for i, caption in enumerate(
        [
            "a dog  on\tgrass ",  # kept, whitespace-normalised as before
            {"en": "a dog"},  # JSON object: caption_not_text (was stored as "{'en': 'a dog'}")
            ["a", "dog"],
            42,
            True,
            "\ud800 lone surrogate",  # caption_binary (was a traceback and a pending journal)
            "caf\u00e9 \U0001f436",  # kept exactly
        ]
    ):
        rows.append({"caption": caption, "image": good_png(img / f"{i}.png", i)})
    res = ingest(write_jsonl(img, rows), "table", tmp_path / "root", opts=OPTS)
    assert res.drops == {"caption_not_text": 4, "caption_binary": 1}
    got = samples(tmp_path / "root")
    assert {s: v["txt"] for s, v in got.items()} == {"pairs.jsonl#0": "a dog on grass", "pairs.jsonl#6": "café 🐶"}
    no_trace_journal(tmp_path / "root")


def test_parquet_binary_captions_are_decoded_not_repr(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="parquet input needs PyPI pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "in"
    folder.mkdir()
    images = [good_png(folder / f"{i}.png", i) for i in range(3)]
    table = pa.table(
        {
            "caption": pa.array([b"first good pair", b"bad \xff\xfe bytes", "caf\u00e9".encode()], pa.binary()),
            "image": images,
        }
    )
    pq.write_table(table, folder / "pairs.parquet")
    res = ingest(folder / "pairs.parquet", "table", tmp_path / "root", opts=OPTS)
    assert res.drops == {"caption_binary": 1}
    got = {s: v["txt"] for s, v in samples(tmp_path / "root").items()}
    assert got == {"pairs.parquet#0": "first good pair", "pairs.parquet#2": "café"}  # not "b'first good pair'"


# --------------------------------------------------------------------- rows that used to stop a crawl
def test_fifo_and_directory_images_never_block(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    (folder / "dir.png").mkdir()
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    rows = [
        {"caption": "a fifo", "image": "fifo.png"},
        {"caption": "a directory", "image": "dir.png"},
        {"caption": "a dangling link", "image": "dangling.png"},
        {"caption": "a good one", "image": good_png(folder / "good.png", 1)},
    ]
    table = write_jsonl(folder, rows)
    res = bounded(lambda: ingest(table, "table", tmp_path / "root", opts=OPTS), 30)  # used to block for ever
    assert res.drops == {"not_regular_file": 2, "missing_file": 1} and res.count == 1
    no_trace_journal(tmp_path / "root")


def test_file_over_max_file_bytes_is_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    big = folder / "big.png"
    good_png(big, 3)
    with open(big, "ab") as fh:
        fh.write(b"\0" * 5000)  # still a decodable PNG, now > 5000 bytes
    rows = [{"caption": "too big", "image": "big.png"}, {"caption": "fine", "image": good_png(folder / "s.png", 4)}]
    opts = ImageOptions(image_size=SIZE, max_file_bytes=5000)
    res = ingest(write_jsonl(folder, rows), "table", tmp_path / "root", opts=opts)
    assert res.drops == {"file_too_large": 1} and res.count == 1


def test_bad_jsonl_lines_are_rows_not_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [
        json.dumps({"caption": "good zero", "image": good_png(folder / "0.png", 0)}),
        '["an", "array", "line"]',  # bad_row (was: the first row's columns error, or a traceback)
        '{"caption": "not json',  # bad_row (was: the whole file refused)
        json.dumps({"caption": "nul path", "image": "a\u0000b.png"}),  # invalid_path (was: ValueError traceback)
        json.dumps({"caption": "number path", "image": 7}),  # invalid_path
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json: bad_row
        json.dumps({"caption": "good five", "image": good_png(folder / "5.png", 5)}),
    ]
    table = folder / "pairs.jsonl"
    data = "\n".join(lines).encode() + b"\n" + b'{"caption": "bad \xff byte", "image": "0.png"}\n'
    table.write_bytes(data)
    res = ingest(table, "table", tmp_path / "root", opts=OPTS)
    assert res.drops == {"bad_row": 4, "invalid_path": 2} and res.records == 8
    assert {s: v["txt"] for s, v in samples(tmp_path / "root").items()} == {
        "pairs.jsonl#0": "good zero",
        "pairs.jsonl#6": "good five",
    }
    no_trace_journal(tmp_path / "root")


def test_csv_giant_field_and_invalid_byte_cost_one_row(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = [good_png(folder / f"{i}.png", i) for i in range(3)]
    giant = "word " * 2_000_000  # a 10 MB field: was csv.Error "field larger than field limit"
    text = f'caption,image\n"first, quoted",{good[0]}\n"{giant}",{good[1]}\n'.encode()
    text += b"bad \xff byte," + good[1].encode() + b"\n" + f"last row,{good[2]}\n".encode()
    (folder / "pairs.csv").write_bytes(text)
    res = ingest(folder / "pairs.csv", "table", tmp_path / "root", opts=OPTS)
    assert res.drops == {"caption_too_long": 1, "bad_row": 1} and res.count == 2
    got = {s: v["txt"] for s, v in samples(tmp_path / "root").items()}
    assert got == {"pairs.csv#0": "first, quoted", "pairs.csv#3": "last row"}


def test_img2dataset_layouts_bad_members(tmp_path: Path) -> None:
    """The files layout with FIFOs for an image and a caption file; a tar with bad captions and a big image."""
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    os.mkfifo(files / "000000000.jpg")
    (files / "000000000.txt").write_text("fifo image")
    good_png(files / "000000001.png", 1)
    os.mkfifo(files / "000000001.txt")
    good_png(files / "000000002.png", 2)
    (files / "000000002.txt").write_text("kept  as text\n")
    res = bounded(lambda: ingest(tmp_path / "files", "img2dataset", tmp_path / "r1", opts=OPTS), 30)
    assert res.drops == {"not_regular_file": 2} and res.count == 1
    assert [v["txt"] for v in samples(tmp_path / "r1").values()] == ["kept as text"]

    tar_dir = tmp_path / "tars"
    tar_dir.mkdir()
    members = []
    for i, (caption, size) in enumerate([(b"ok \xe2\x9c\x93", 0), (b"bad \xff", 0), (b"nul \0", 0), (b"big", 6000)]):
        good_png(tar_dir / "p.png", 10 + i)
        members += [(f"{i:09d}.png", (tar_dir / "p.png").read_bytes() + b"\0" * size), (f"{i:09d}.txt", caption)]
    with tarfile.open(tar_dir / "00000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tar_dir / "p.png").unlink()
    opts = ImageOptions(image_size=SIZE, max_file_bytes=5000)
    res = ingest(tar_dir, "img2dataset", tmp_path / "r2", opts=opts)
    assert res.drops == {"caption_binary": 2, "file_too_large": 1} and res.count == 1
    assert [v["txt"] for v in samples(tmp_path / "r2").values()] == ["ok \u2713"]


def test_missing_column_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    table = write_jsonl(folder, [{"text": "x", "image": good_png(folder / "0.png", 0)}])
    with pytest.raises(ValueError, match="lack caption column 'caption'"):
        ingest(table, "table", tmp_path / "root")
    assert not (tmp_path / "root/manifest.json").exists()
    no_trace(tmp_path / "root")


# --------------------------------------------------------------------- the manifest gains only real stages
def test_rerun_is_a_noop_naming_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    table = write_jsonl(folder, [{"caption": f"pair {i}", "image": good_png(folder / f"{i}.png", i)} for i in range(3)])
    root = tmp_path / "root"
    argv = ["ingest", "--input", str(table), "--format", "table", "--data-root", str(root), "--image-size", "16"]
    assert cli_main(argv) == 0
    manifest = (root / "manifest.json").read_bytes()
    sha = load_manifest(root)["stages"][0]["sources"][0]["input_sha256"]
    capsys.readouterr()
    assert cli_main(argv) == 0  # a retried job (was: an EMPTY stage 2 appended)
    out = capsys.readouterr().out
    assert f"already ingested as stage 1 (input sha256 {sha}); nothing to do" in out
    assert (root / "manifest.json").read_bytes() == manifest
    assert cli_main([*argv, "--stage", "1"]) == 0  # an explicit --stage of the same ingest: also a no-op
    no_trace(root, 2)


def test_all_dropped_run_exits_1_and_appends_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    table = write_jsonl(folder, [{"caption": "", "image": "x.png"}, {"caption": "y", "image": "missing.png"}])
    root = tmp_path / "root"
    rc = cli_main(["ingest", "--input", str(table), "--format", "table", "--data-root", str(root)])
    lines = error_lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1, lines
    assert "stage 1 not written: 0 of 2 pairs kept" in lines[0] and "caption_empty=1" in lines[0]
    assert "missing_file=1" in lines[0] and "nothing was appended" in lines[0]
    assert not (root / "manifest.json").exists()
    no_trace(root)


def test_all_duplicates_exits_1_and_appends_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    images = [good_png(folder / f"{i}.png", i) for i in range(2)]
    root = tmp_path / "root"
    ingest(write_jsonl(folder, [{"caption": f"a {i}", "image": p} for i, p in enumerate(images)]), "table", root)
    before = (root / "manifest.json").read_bytes()
    again = write_jsonl(folder, [{"caption": f"b {i}", "image": p} for i, p in enumerate(images)], "again.jsonl")
    with pytest.raises(IngestFailed, match=r"duplicate_across_stages=2.*already in an earlier stage"):
        ingest(again, "table", root)
    assert (root / "manifest.json").read_bytes() == before
    no_trace(root, 2)


def test_empty_input_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_jsonl(tmp_path / "in", [])
    rc = cli_main(["ingest", "--input", str(table), "--format", "table", "--data-root", str(tmp_path / "root")])
    lines = error_lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1 and "has no pairs" in lines[0]
    no_trace(tmp_path / "root")


def test_empty_stage_is_refused_and_repair_removes_it(tmp_path: Path) -> None:
    """A stage appended empty by the old bug: check_no_empty_stages names the fix, validate --repair applies it."""
    folder = tmp_path / "in"
    folder.mkdir()
    root = tmp_path / "root"
    ingest(write_jsonl(folder, [{"caption": "one", "image": good_png(folder / "0.png", 0)}]), "table", root)
    m = load_manifest(root)
    empty = {**m["stages"][0], "stage": 2, "dir": "shards/stage_02", "count": 0, "shards": [], "drops": {}}
    empty["hashes"] = "shards/stage_02/hashes.txt"
    (root / "shards/stage_02").mkdir()
    (root / "shards/stage_02/hashes.txt").write_text("")
    m["stages"].append(empty)
    save_manifest(root, m)
    assert empty_stages(load_manifest(root)) == [2]
    with pytest.raises(ValueError, match=r"stage 2 of the corpus holds no pairs .*validate .* --repair"):
        check_no_empty_stages(load_manifest(root), root)
    report = validate(root)
    assert not report.ok and "stage 2: holds no pairs" in report.render()
    assert validate(root, repair=True).ok
    assert [s["stage"] for s in load_manifest(root)["stages"]] == [1]
    assert not (root / "shards/stage_02").exists()
    check_no_empty_stages(load_manifest(root), root)
    res = ingest(
        write_jsonl(folder, [{"caption": "two", "image": good_png(folder / "1.png", 1)}], "b.jsonl"),
        "table",
        root,
        stage=2,
    )
    assert res.stage == 2 and res.count == 1


def test_truncated_manifest_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    root = tmp_path / "root"
    table = write_jsonl(folder, [{"caption": "one", "image": good_png(folder / "0.png", 0)}])
    ingest(table, "table", root)
    path = root / "manifest.json"
    path.write_bytes(path.read_bytes()[:50])
    for argv in (
        ["validate", str(root)],
        ["stats", str(root)],
        ["ingest", "--input", str(table), "--format", "table", "--data-root", str(root)],
    ):
        assert cli_main(argv) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and f"{path} is not valid JSON" in lines[0] and "restore it" in lines[0], lines


# -------------------------------------------------------------------------------- the CLI's one line
def test_unexpected_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from data_tools import validate as validate_mod

    def boom(*args: Any, **kw: Any) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(validate_mod, "validate", boom)
    assert cli_main(["validate", "/nonexistent"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "KeyError: 'surprise' (python -m data_tools validate)" in line and "GROWCLIP_TRACEBACK=1" in line


def test_python_dash_m_surrogate_caption_one_line(tmp_path: Path) -> None:
    """As a user runs it: a row that used to leave a traceback and a pending journal."""
    folder = tmp_path / "in"
    folder.mkdir()
    table = folder / "pairs.jsonl"
    table.write_text('{"caption": "\\ud800", "image": "x.png"}\n')
    argv = ["ingest", "--input", str(table), "--format", "table", "--data-root", str(tmp_path / "root")]
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert proc.stderr.rstrip().endswith(line) and "caption_binary=1" in line
    no_trace(tmp_path / "root")


def test_a_journal_of_an_older_version_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    table = write_jsonl(folder, [{"caption": "pair", "image": good_png(folder / "0.png", 0)}])
    root = tmp_path / "root"
    journal = root / ".ingest" / "stage_01" / "journal.json"
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps({"version": 1, "fingerprint": "old", "shards": [], "consumed": 0, "drops": {}}))
    argv = ["ingest", "--input", str(table), "--format", "table", "--data-root", str(root)]
    assert cli_main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "journaled by an older version (journal version 1" in line and "delete" in line
