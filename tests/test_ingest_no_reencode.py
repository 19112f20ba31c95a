"""``ingest --no-reencode``: shards registered with their own image bytes where they fit; the stage records its
image size and format; plan/submit/train refuse a model larger than its shards (issue #19 items 2 and 4)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as cli_main
from data_tools.imaging import ImageOptions, fits_as_is
from data_tools.ingest import IngestFailed, ingest, write_tar
from data_tools.manifest import load_manifest, save_manifest, stage_image
from data_tools.validate import validate
from jobs.config import ConfigError
from jobs.engine.data import check_corpus
from tests.helpers import stage_samples

SIZE = 32


def photo(seed: int, w: int = SIZE, h: int = SIZE, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    return img.convert(mode)


def jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rotated_jpeg(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    return jpeg(img, exif=exif)


def crawl(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An img2dataset-style webdataset shard: what fits and what does not."""
    images = {
        "000000000": jpeg(photo(0)),  # fits
        "000000001": jpeg(photo(1)),  # fits
        "000000002": jpeg(photo(2, mode="L")),  # greyscale JPEG at size: fits
        "000000003": png(photo(3)),  # PNG: re-encoded
        "000000004": jpeg(photo(4, 48, 48)),  # larger: re-encoded (resized)
        "000000005": rotated_jpeg(photo(5)),  # EXIF rotation: re-encoded (rotation applied)
        "000000006": jpeg(photo(0)),  # the pixels of 000000000: duplicate
        "000000007": jpeg(photo(7))[:200],  # truncated: decode_error
    }
    samples = [
        {"__key__": k, "jpg": v, "txt": f"caption {k}", "json": json.dumps({"url": f"http://x/{k}.jpg"})}
        for k, v in images.items()
    ]
    src = tmp_path / "crawl"
    src.mkdir()
    write_tar(src / "00000.tar", samples)
    return src, images


def test_fits_as_is_rules() -> None:
    opts = ImageOptions(image_size=SIZE)

    def fits(data: bytes, o: ImageOptions = opts) -> bool:
        return fits_as_is(Image.open(io.BytesIO(data)), o)

    assert fits(jpeg(photo(0))) and fits(jpeg(photo(0, mode="L")))
    assert not fits(png(photo(0)))
    assert not fits(jpeg(photo(0, 48, 48)))
    assert not fits(jpeg(photo(0, 40, SIZE)))  # not square
    assert fits(jpeg(photo(0, 40, SIZE)), ImageOptions(image_size=SIZE, resize_mode="keep_ratio"))
    assert not fits(rotated_jpeg(photo(0)))
    assert not fits(jpeg(photo(0, mode="CMYK")))


def test_no_reencode_keeps_bytes_and_counts(tmp_path: Path) -> None:
    src, images = crawl(tmp_path)
    root = tmp_path / "root"
    res = ingest(src, "img2dataset", root, opts=ImageOptions(image_size=SIZE, reencode=False))
    assert res.count == 6 and res.drops == {"decode_error": 1, "duplicate_in_stage": 1}
    (entry,) = load_manifest(root)["stages"]
    assert entry["image"] == {"size": SIZE, "format": "jpeg", "resize_mode": "border", "as_is": 3, "reencoded": 3}
    assert entry["options"]["reencode"] is False
    stored = {source.split("/")[-1]: s for source, s in stage_samples(root, 1).items()}
    for key in ("000000000", "000000001", "000000002"):
        assert stored[key]["jpg"] == images[key]  # the input's own bytes
    for key in ("000000003", "000000004", "000000005"):
        assert stored[key]["jpg"] != images[key]
        assert Image.open(io.BytesIO(stored[key]["jpg"])).size == (SIZE, SIZE)
    # the rotation was applied to the re-encoded one: its stored pixels are the rotated picture
    shown = np.asarray(Image.open(io.BytesIO(stored["000000005"]["jpg"])), dtype=np.int16)
    rotated = np.asarray(photo(5).transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    as_stored = np.asarray(photo(5), dtype=np.int16)
    assert np.abs(shown - rotated).mean() * 3 < np.abs(shown - as_stored).mean()
    report = validate(root)
    assert report.ok and report.samples == 6, report.render()


def test_no_reencode_dedupes_against_reencoded_stages(tmp_path: Path) -> None:
    """The pixel hash is the same whichever path stored an image: a crawl registered as is dedupes against a stage
    that re-encoded the same pictures, and the other way round."""
    src, _ = crawl(tmp_path)
    root = tmp_path / "root"
    ingest(src, "img2dataset", root, opts=ImageOptions(image_size=SIZE))
    out = cli_main(["ingest", "--input", str(src), "--format", "img2dataset", "--data-root", str(root),
                    "--image-size", str(SIZE), "--no-reencode"])  # fmt: skip
    assert out == 1  # every pair is already in stage 1: nothing appended
    assert len(load_manifest(root)["stages"]) == 1


def test_no_reencode_rerun_is_a_noop_and_default_options_still_match(tmp_path: Path) -> None:
    src, _ = crawl(tmp_path)
    root = tmp_path / "root"
    opts = ImageOptions(image_size=SIZE, reencode=False)
    first = ingest(src, "img2dataset", root, opts=opts)
    assert ingest(src, "img2dataset", root, opts=opts).already_ingested
    # a re-encoding ingest of the same input is a different stage's options: not "already ingested"
    with pytest.raises(IngestFailed, match="duplicate_across_stages=7"):
        ingest(src, "img2dataset", root, opts=ImageOptions(image_size=SIZE))
    # a stage ingested before the option existed (no "reencode" in its options) is recognised by the default
    other = tmp_path / "root2"
    ingest(src, "img2dataset", other, opts=ImageOptions(image_size=SIZE))
    manifest = load_manifest(other)
    del manifest["stages"][0]["options"]["reencode"]
    save_manifest(other, manifest)
    assert ingest(src, "img2dataset", other, opts=ImageOptions(image_size=SIZE)).already_ingested
    assert first.count == 6


def test_stage_image_of_an_older_manifest() -> None:
    old = {"options": {"image_size": 64, "resize_mode": "center_crop"}}
    assert stage_image(old) == {"size": 64, "format": "jpeg", "resize_mode": "center_crop"}


def test_model_larger_than_shards_is_refused_or_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, _ = crawl(tmp_path)
    root = tmp_path / "root"
    ingest(src, "img2dataset", root, opts=ImageOptions(image_size=SIZE))
    (root / "tokenizer.json").write_text("{}")
    check_corpus(root, 1, 64, tokenizer=None, image_size=SIZE)  # equal: fine
    check_corpus(root, 1, 64, tokenizer=None, image_size=16)  # smaller: the loader downsizes
    with pytest.raises(ConfigError, match=r"image_size=64 is larger than the shard images \(stage 1: 32 px") as err:
        check_corpus(root, 1, 64, tokenizer=None, image_size=64)
    assert "--set model.image.image_size=32" in str(err.value) and "--image-size 64" in str(err.value)
    assert "data.allow_upscale=true" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="jobs.engine.data"):
        check_corpus(root, 1, 64, tokenizer=None, image_size=64, allow_upscale=True)
    assert "upscales them" in caplog.text


def test_plan_refuses_a_model_larger_than_its_shards(tiny_config: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from jobs.cli import main as jobs_main

    base = ["plan", "--config", str(tiny_config), "--run-dir", str(tmp_path / "run"), "--executor", "local"]
    capsys.readouterr()
    assert jobs_main([*base, "--set", "model.image.image_size=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.image.image_size=32 is larger than the shard images (stage 1: 16 px" in err[0]
    assert jobs_main([*base, "--set", "model.image.image_size=32", "--set", "data.allow_upscale=true"]) == 0
    assert jobs_main(base) == 0


def test_registering_growclip_shards_keeps_what_was_measured_on_the_originals(tmp_path: Path) -> None:
    """Shards an earlier ingest wrote (the autopilot's staged crawls) registered with --no-reencode: size-filtered on
    the originals' recorded size (--min-size 40: > the 32 px they were shrunk to, < the 48 px original), not decoded,
    and their pixel hash, original size and source are the originals', so a later ingest of the raw crawl is
    recognised as a duplicate."""
    src, _ = crawl(tmp_path)
    opts = ImageOptions(image_size=SIZE, min_size=40, reencode=False)
    staged = ingest(src, "img2dataset", tmp_path / "staging", opts=opts)
    assert staged.count == 1 and staged.drops["too_small"] == 6  # only the 48 px picture passes --min-size 40
    root = tmp_path / "root"
    res = ingest(tmp_path / "staging" / "shards" / "stage_01", "img2dataset", root, opts=opts)
    assert res.count == 1 and res.drops == {}
    before = stage_samples(tmp_path / "staging", 1)
    after = {s["meta"]["source"]: s for s in stage_samples(root, 1).values()}
    assert set(after) == set(before) == {"00000.tar/000000004"}
    for source, sample in before.items():
        kept = after[source]
        assert kept["jpg"] == sample["jpg"]
        for field in ("pixel_sha256", "orig_width", "orig_height", "jpg_sha256"):
            assert kept["meta"][field] == sample["meta"][field]
    (entry,) = load_manifest(root)["stages"]
    assert entry["image"]["as_is"] == 1
    with pytest.raises(IngestFailed, match="duplicate_across_stages=1"):
        ingest(src, "img2dataset", root, opts=opts)  # the raw crawl again: its one kept picture is a duplicate
    stricter = ImageOptions(image_size=SIZE, min_size=50, reencode=False)  # stricter than the staging's filters
    with pytest.raises(IngestFailed, match="too_small=1"):  # checked on the original's recorded 48 px, not decoded
        ingest(tmp_path / "staging" / "shards" / "stage_01", "img2dataset", tmp_path / "root2", opts=stricter)
