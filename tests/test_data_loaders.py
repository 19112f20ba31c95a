"""Tokenizer round trip and the loaders: shapes, replay mix, held-out split, error counting (issue #4)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import data_tools
from data_tools.eval_sets import load_eval_task
from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest, write_tar
from data_tools.loaders import (
    MEAN,
    STD,
    DataStreamError,
    LoaderStats,
    TrainBatch,
    image_to_tensor,
    is_heldout,
    make_train_loader,
    make_val_loader,
    normalize_batch,
    stage_weights,
)
from data_tools.manifest import load_manifest, save_manifest, sha256_file
from data_tools.synthetic import make_table_input
from data_tools.tokenizer import load_tokenizer, special_ids, tokenize, train_tokenizer
from tests.helpers import bounded


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny stages (40 + 40 pairs, 32 px) with a tokenizer."""
    tmp = tmp_path_factory.mktemp("corpus")
    root = tmp / "root"
    opts = ImageOptions(image_size=32)
    ingest(make_table_input(tmp / "a", 40, seed=1), "table", root, opts=opts, shard_size=10)
    ingest(make_table_input(tmp / "b", 40, seed=2), "table", root, opts=opts, shard_size=10)
    train_tokenizer(root, vocab_size=300)
    return root


def test_tokenizer_round_trip(corpus: Path) -> None:
    tok = load_tokenizer(corpus)
    ids = special_ids(tok)
    assert ids["pad"] == 0 and ids["sot"] == 1
    assert ids["eot"] == tok.get_vocab_size() - 1, "EOT must be the largest id (argmax pooling)"
    out = data_tools.tokenize(["picture number 3 of seed 1", "x " * 100], 16, tok)
    assert out.shape == (2, 16) and out.dtype == torch.long
    assert out[0, 0] == ids["sot"] and (out[0] == ids["eot"]).sum() == 1
    eot_pos = int(out[0].argmax())
    assert out[0, eot_pos] == ids["eot"] and (out[0, eot_pos + 1 :] == 0).all()
    assert out[1, -1] == ids["eot"], "a truncated text still ends with EOT"
    assert tok.decode(out[0, 1:eot_pos].tolist()).strip() == "picture number 3 of seed 1"
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"))
    enc = hf("picture number 3")["input_ids"]
    assert enc[0] == ids["sot"] and enc[-1] == ids["eot"]
    assert torch.equal(tokenize("a", 4, corpus / "tokenizer.json"), tokenize(["a"], 4, tok))


def test_stage_weights() -> None:
    assert stage_weights([1], 0.3) == {1: 1.0}
    w = stage_weights([1, 2, 3], 0.4)
    assert w == pytest.approx({1: 0.2, 2: 0.2, 3: 0.6})
    with pytest.raises(ValueError, match="replay"):
        stage_weights([1, 2], 1.0)


def test_train_loader_shapes_and_replay_mix(corpus: Path) -> None:
    dl = make_train_loader(corpus, [1, 2], batch_size=16, image_size=24, context_length=12, replay=0.25, seed=3)
    it = iter(dl)
    for _ in range(25):
        images, tokens = next(it)
    assert images.shape == (16, 3, 24, 24) and images.dtype == torch.float32
    assert tokens.shape == (16, 12) and tokens.dtype == torch.long
    counts = dl.dataset.stage_counts
    share_old = counts[1] / (counts[1] + counts[2])
    assert 0.15 < share_old < 0.35, counts  # expected 0.25 over 400 samples


def test_train_loader_workers_and_ranks(corpus: Path) -> None:
    kw = {"batch_size": 8, "image_size": 16, "context_length": 8, "replay": 0.5, "shuffle_buffer": 16}
    a0 = next(iter(make_train_loader(corpus, [1, 2], seed=0, rank=0, world_size=2, **kw)))[1]
    a0_again = next(iter(make_train_loader(corpus, [1, 2], seed=0, rank=0, world_size=2, **kw)))[1]
    a1 = next(iter(make_train_loader(corpus, [1, 2], seed=0, rank=1, world_size=2, **kw)))[1]
    assert torch.equal(a0, a0_again), "same seed and rank must give the same stream"
    assert not torch.equal(a0, a1), "ranks must see different samples"
    images, _ = next(iter(make_train_loader(corpus, [1], seed=0, num_workers=2, **kw)))
    assert images.shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="rank"):
        make_train_loader(corpus, [1], rank=2, world_size=2, **kw)
    with pytest.raises(ValueError, match="stages"):
        make_train_loader(corpus, [7], **kw)


def test_heldout_split_is_deterministic_and_excluded(corpus: Path) -> None:
    keys = [f"s01_{i:08d}" for i in range(2000)]
    frac = sum(is_heldout(k, 0.1) for k in keys) / len(keys)
    assert 0.07 < frac < 0.13
    batches = make_val_loader(corpus, 1, batch_size=4, image_size=16, context_length=8, val_fraction=0.3)
    again = make_val_loader(corpus, 1, batch_size=4, image_size=16, context_length=8, val_fraction=0.3)
    n = sum(b[0].shape[0] for b in batches)
    assert 0 < n < 40 and all(torch.equal(x[1], y[1]) for x, y in zip(batches, again, strict=True))


def test_loader_counts_and_skips_bad_samples(tmp_path: Path, corpus: Path) -> None:
    """A shard with an undecodable JPEG and a sample without caption: counted by reason, not raised."""
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    shard = root / "shards/stage_01/000000.tar"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="JPEG")
    samples = [
        {"__key__": "s01_x", "jpg": buf.getvalue(), "txt": "ok"},
        {"__key__": "s01_bad", "jpg": b"not a jpeg", "txt": "bad"},
        {"__key__": "s01_nocap", "jpg": buf.getvalue()},
    ]
    write_tar(shard, samples)
    m = load_manifest(root)
    m["stages"][0]["shards"] = [
        {"name": "shards/stage_01/000000.tar", "count": 3, "sha256": sha256_file(shard), "bytes": 0}
    ]
    save_manifest(root, m)
    dl = make_train_loader(root, [1], batch_size=4, image_size=16, context_length=8, shuffle_buffer=2)
    images, _ = next(iter(dl))
    assert images.shape == (4, 3, 16, 16)
    assert dl.dataset.errors["image_decode_error"] >= 1 and dl.dataset.errors["missing_part"] >= 1


def _jpeg(colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _one_shard_stage(root: Path, samples: list[dict[str, Any]], stage: int = 1) -> None:
    """Replace ``stage``'s shards by one shard holding ``samples``."""
    shard = root / f"shards/stage_{stage:02d}/000000.tar"
    write_tar(shard, samples)
    m = load_manifest(root)
    entry = next(e for e in m["stages"] if e["stage"] == stage)
    entry["shards"] = [{"name": str(shard.relative_to(root)), "count": len(samples), "sha256": sha256_file(shard)}]
    save_manifest(root, m)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_stats_reach_the_main_process(tmp_path: Path, corpus: Path, num_workers: int) -> None:
    """Each batch carries its reader's counts: with workers, the main process still sees every fault.

    The shard is [bad jpeg, good, no caption, good] and shuffle_buffer=1 decodes in stream order, so
    every delivered sample is preceded by exactly one fault, alternating between the two reasons.
    """
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    _one_shard_stage(
        root,
        [
            {"__key__": "s01_bad", "jpg": b"not a jpeg", "txt": "bad"},
            {"__key__": "s01_a", "jpg": _jpeg(), "txt": "ok a"},
            {"__key__": "s01_nocap", "jpg": _jpeg()},
            {"__key__": "s01_b", "jpg": _jpeg((9, 9, 9)), "txt": "ok b"},
        ],
    )
    dl = make_train_loader(
        root, [1], batch_size=4, image_size=16, context_length=8, shuffle_buffer=1, num_workers=num_workers
    )
    it = iter(dl)
    manual = LoaderStats()
    for _ in range(6):
        batch = next(it)
        manual.update(batch)
        images, tokens = batch  # still unpacks like a pair
        assert isinstance(batch, TrainBatch) and images.shape == (4, 3, 16, 16) and tokens.shape == (4, 8)
        assert batch.stats == {"stages": {1: 4}, "errors": {"image_decode_error": 2, "missing_part": 2}}
    assert dl.stats.errors == {"image_decode_error": 12, "missing_part": 12}
    assert dl.stats.stages == {1: 24} and dl.stats.batches == 6 and dl.stats.stage_mix() == {1: 1.0}
    assert manual == dl.stats
    assert dl.stats.as_dict()["skipped"] == {"image_decode_error": 12, "missing_part": 12}
    if num_workers == 0:  # the per-process counters keep working where the reader is this process
        assert dl.dataset.errors == dl.stats.errors and dl.dataset.stage_counts == dl.stats.stages


def test_loader_stats_stage_mix(corpus: Path) -> None:
    dl = make_train_loader(corpus, [1, 2], batch_size=8, image_size=16, context_length=8, replay=0.5, num_workers=2)
    it = iter(dl)
    for _ in range(10):
        next(it)
    assert dl.stats.samples == 80 and set(dl.stats.stages) == {1, 2} and not dl.stats.errors


@pytest.mark.parametrize("val_fraction", [1.0, 1.5, -0.1])
def test_val_fraction_validated(corpus: Path, val_fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        make_train_loader(corpus, [1], batch_size=4, val_fraction=val_fraction)
    with pytest.raises(ValueError, match="val_fraction"):
        make_val_loader(corpus, 1, batch_size=4, val_fraction=val_fraction)


def test_all_corrupt_stage_stops_with_clear_error(tmp_path: Path, corpus: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    _one_shard_stage(root, [{"__key__": f"s02_{i}", "jpg": b"junk", "txt": "x"} for i in range(5)], stage=2)
    dl = make_train_loader(root, [1, 2], batch_size=4, image_size=16, context_length=8, shuffle_buffer=4)
    with pytest.raises(DataStreamError, match=r"stage 2: 1000 consecutive.*image_decode_error.*000000\.tar"):
        bounded(lambda: [next(it) for it in [iter(dl)] for _ in range(10_000)])


def test_unreadable_stage_stops_with_clear_error(tmp_path: Path, corpus: Path) -> None:
    """Shards that are not tars at all: the resampler would otherwise retry them forever."""
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    for shard in (root / "shards/stage_01").glob("*.tar"):
        shard.write_bytes(b"\x01" * 100)
    dl = make_train_loader(root, [1], batch_size=4, image_size=16, context_length=8, max_consecutive_failures=50)
    with pytest.raises(DataStreamError, match=r"stage 1: 50 consecutive.*shard_unreadable_or_empty"):
        bounded(lambda: next(iter(dl)))
    assert dl.dataset.errors["shard_read_error"] >= 49


def test_all_held_out_stage_stops(tmp_path: Path, corpus: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    keys = [k for k in (f"s01_h{i}" for i in range(500)) if is_heldout(k, 0.5)][:3]
    _one_shard_stage(root, [{"__key__": k, "jpg": _jpeg(), "txt": "x"} for k in keys])
    dl = make_train_loader(root, [1], batch_size=2, image_size=16, context_length=8, val_fraction=0.5)
    with pytest.raises(DataStreamError, match=r"held_out.*lower val_fraction"):
        bounded(lambda: next(iter(dl)))


@pytest.mark.parametrize("cut", ["data_end", "in_padding", "header", "in_header"])
def test_val_loader_keeps_the_sample_completed_before_a_truncation(tmp_path: Path, corpus: Path, cut: str) -> None:
    """A tar cut after the last byte of a sample (in its padding, or in the next header): that sample is kept,
    as by the training reader."""
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    keys = [k for k in (f"s01_v{i}" for i in range(500)) if is_heldout(k, 0.5)][:4]
    _one_shard_stage(
        root, [{"__key__": k, "jpg": _jpeg((10 * i, 0, 0)), "txt": f"cap {i}"} for i, k in enumerate(keys)]
    )
    shard = root / "shards/stage_01/000000.tar"
    with tarfile.open(shard) as tf:
        last = max((tf.getmember(f"{keys[1]}.{e}") for e in ("jpg", "txt")), key=lambda m: m.offset)
        data_end, header = last.offset_data + last.size, tf.getmember(f"{keys[2]}.jpg").offset
    assert header - data_end > 2, "the test needs padding after sample 1's last member"
    at = {"data_end": data_end, "in_padding": (data_end + header) // 2, "header": header, "in_header": header + 100}
    shard.write_bytes(shard.read_bytes()[: at[cut]])
    batches = make_val_loader(root, 1, batch_size=8, image_size=16, context_length=8, val_fraction=0.5)
    reds = [round(float(img[0].mean() * STD[0] + MEAN[0]) * 255 / 10) for img in batches[0][0]]
    assert reds == [0, 1], f"expected samples 0 and 1 (the cut is after sample 1), got {reds}"


@pytest.mark.parametrize("kind", ["classification", "retrieval"])
def test_eval_task_skips_the_sample_a_truncation_cut_through(tmp_path: Path, kind: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """A cut inside a sample's second member leaves that sample with one part: skipped, counted, no KeyError."""
    tdir = tmp_path / "eval" / "toy"
    (tdir / "test").mkdir(parents=True)
    part = {"classification": "cls", "retrieval": "txt"}[kind]
    value = {"classification": "{}", "retrieval": "a caption of sample {}"}[kind]
    samples = [{"__key__": f"{i:06d}", "jpg": _jpeg((40 * i, 0, 0)), part: value.format(i % 2)} for i in range(5)]
    write_tar(tdir / "test" / "0.tar", samples)
    (tdir / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "eval" / "tasks.json").write_text(json.dumps({"tasks": {"toy": {"type": kind, "count": 5}}}))
    if kind == "classification":
        (tdir / "classnames.txt").write_text("a\nb\n")
        (tdir / "zeroshot_classification_templates.txt").write_text("a photo of {c}\n")
    with tarfile.open(tdir / "test" / "0.tar") as tf:
        second = max((tf.getmember(f"000003.{e}") for e in ("jpg", part)), key=lambda m: m.offset)
    data = (tdir / "test" / "0.tar").read_bytes()
    (tdir / "test" / "0.tar").write_bytes(data[: second.offset_data + max(second.size // 2, 1)])
    task = load_eval_task(tmp_path, "toy", image_size=16)
    assert task.images.shape[0] == 3, "samples 0-2 are whole; 3 was cut, 4 is gone"
    assert "skipped 1 incomplete samples" in caplog.text
    if kind == "classification":
        assert task.labels.tolist() == [0, 1, 0]
    else:
        assert task.captions == [[value.format(i % 2)] for i in range(3)]


def test_special_token_strings_in_captions_are_not_special(corpus: Path) -> None:
    """A caption quoting ``<end_of_text>`` must not move the EOT (argmax) pooling position."""
    tok = load_tokenizer(corpus)
    ids = special_ids(tok)
    texts = ["a cat <end_of_text> on a mat", "<pad><start_of_text>dog<end_of_text>", "<end_of_<pad>text> x"]
    out = tokenize(texts, 24, tok)
    for row in out:
        eot_at = int((row == ids["eot"]).nonzero()[-1])
        assert int(row.argmax()) == eot_at and (row == ids["eot"]).sum() == 1
        assert (row[1:eot_at] != ids["pad"]).all() and (row[1:eot_at] != ids["sot"]).all()
        assert (row[eot_at + 1 :] == ids["pad"]).all()
    assert tok.decode(out[0, 1 : int(out[0].argmax())].tolist()).strip() == "a cat on a mat"
    assert torch.equal(tokenize("plain caption", 12, tok), tokenize(["plain caption"], 12, tok))
    assert tokenize([], 6, tok).shape == (0, 6)


def test_normalize_batch_matches_reference() -> None:
    """The single normalisation place: uint8 -> (x / 255 - MEAN) / STD, as the per-image helper does."""
    from data_tools.loaders import MEAN, STD

    img = Image.new("RGB", (5, 4), (10, 128, 250))
    x = torch.tensor([10, 128, 250], dtype=torch.float32).view(3, 1, 1).expand(3, 4, 5)
    ref = (x / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(image_to_tensor(img), ref, atol=1e-5)
    u8 = torch.full((2, 3, 4, 5), 77, dtype=torch.uint8)
    assert normalize_batch(u8).dtype == torch.float32 and normalize_batch(u8).shape == (2, 3, 4, 5)


# --- the fast reader, decoder and tokenizer path (issue #9 item 4) gives what the tarfile/PIL path gives ---


def _reference_shard(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The previous reader: ``tarfile`` stream mode with ``ignore_zeros`` + webdataset's ``group_by_keys``.

    Returns the samples and, for each counted read error, how many samples had been delivered before it.
    """
    import tarfile

    import webdataset as wds

    out: list[dict[str, Any]] = []
    errors: list[int] = []

    def handler(exc: Exception) -> bool:
        errors.append(len(out))
        return True

    def members() -> Any:
        n = 0
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True) as tf:
                for info in tf:
                    n += 1
                    if not info.isreg() or info.name.startswith("__"):
                        continue
                    fh = tf.extractfile(info)
                    yield {"fname": info.name, "data": fh.read() if fh else b"", "__url__": str(path)}
            if n == 0:
                raise tarfile.ReadError("no tar member")
        except Exception as exc:
            handler(exc)
        yield {}

    for sample in wds.tariterators.group_by_keys(members(), handler=handler):
        out.append(sample)
    return out, errors


def _fast_shard(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    from data_tools.loaders import _shard_samples

    out: list[dict[str, Any]] = []
    errors: list[int] = []
    for sample in _shard_samples(str(path), lambda exc: errors.append(len(out))):
        out.append(sample)
    return out, errors


def _base_tar(fmt: int, seed: int) -> bytes:
    """A shard-like tar with the odd members real tars have: directories, links, long and prefixed names,
    upper-case and dotted extensions, meta files, empty and block-sized files, a repeated extension, huge uid."""
    import random
    import tarfile

    rng = random.Random(seed)
    buf = io.BytesIO()

    def add(name: str, data: bytes = b"", **kw: Any) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 946684800
        for k, v in kw.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if info.isreg() else None)

    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        add("dir", type=tarfile.DIRTYPE)
        for i in range(12):
            key = f"s01_{i:08d}"
            size = rng.choice([0, 1, 511, 512, 513, 1024, rng.randrange(2000)])
            add(f"{key}.jpg", bytes(rng.randrange(256) for _ in range(size)))
            add(f"{key}.txt", f"caption {i}".encode())
            if i % 3 == 0:
                add(f"{key}.json", b"{}")
        add("__meta__.json", b"{}")
        add("noext", b"x")
        add("s01_up.JPG", b"upper")
        add("s01_up.seg.txt", b"dotted")
        add("link.txt", type=tarfile.SYMTYPE, linkname="s01_up.JPG")
        add("s01_dup.txt", b"a")
        add("s01_dup.txt", b"b")
        add("sub/dir/s01_nested.txt", b"nested")
        add("p" * 90 + "/" + "q" * 60 + ".txt", b"prefixed or long")
        if fmt != tarfile.USTAR_FORMAT:
            add("l" * 120 + ".txt", b"long name")
            add("s01_bigid.txt", b"uid", uid=8**9)
            add("s01_ünï.txt", "ünïcode".encode())
    return buf.getvalue()


def _damage(data: bytes, rng: Any) -> bytes:
    """One random kind of damage: a cut, header bytes changed (checksum fixed up or not), zero or junk blocks."""
    blocks = len(data) // 512
    kind = rng.randrange(5)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    b = bytearray(data)
    if kind in (1, 2):
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(blocks) * 512
            b[at + rng.randrange(512)] = rng.choice([0, 32, 48, 55, 56, 120, 0x80, 0xFF, rng.randrange(256)])
            if kind == 2:  # a valid checksum over the changed header: the reader must follow whatever it says
                b[at + 148 : at + 156] = b" " * 8
                b[at + 148 : at + 156] = f"{sum(b[at : at + 512]):06o}\0 ".encode()
        return bytes(b)
    at = rng.randrange(blocks + 1) * 512
    fill = bytes(512) if kind == 3 else bytes(rng.randrange(256) for _ in range(512))
    return bytes(b[:at]) + fill * rng.randint(1, 2) + bytes(b[at:])


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_fast_tar_reader_matches_tarfile(tmp_path: Path, fmt: str) -> None:
    """Same samples, same bytes, same read errors at the same points as tarfile + group_by_keys, on clean
    and on hundreds of randomly damaged shards (cuts, bad and 'valid' headers, zero and junk blocks)."""
    import gzip
    import random
    import tarfile

    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    rng = random.Random(fmt)
    base = _base_tar(formats[fmt], seed=len(fmt))
    cases = [base, b"", b"\x01" * 100, b"\x01" * 2048, bytes(4096), base[:512], gzip.compress(base, mtime=0)]
    cases += [_damage(base, rng) for _ in range(300)]
    path = tmp_path / "shard.tar"
    for i, data in enumerate(cases):
        path.write_bytes(data)
        expected = _reference_shard(path)
        assert _fast_shard(path) == expected, f"{fmt} case {i}"
    assert len(_reference_shard(tmp_path / "missing.tar")[1]) == 1 == len(_fast_shard(tmp_path / "missing.tar")[1])


def test_fast_jpeg_decode_matches_pil() -> None:
    """A JPEG with a header already seen is decoded without PIL's parser: same pixels, same failures."""
    import random

    import numpy as np

    from data_tools.loaders import _JPEG_HEADERS, _open_image
    from data_tools.synthetic import random_image

    def reference(data: bytes) -> Any:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            return np.asarray(img.convert("RGB"))
        except Exception as exc:
            return type(exc)

    def fast(data: bytes) -> Any:
        try:
            return np.asarray(_open_image(data))
        except Exception as exc:
            return type(exc)

    rng, nprng = random.Random(0), np.random.default_rng(0)
    jpegs = []
    for size, quality in [((32, 32), 90), ((32, 32), 95), ((40, 24), 90)]:
        for _ in range(4):
            buf = io.BytesIO()
            random_image(nprng, *size).save(buf, format="JPEG", quality=quality)
            jpegs.append(buf.getvalue())
    for data in jpegs:  # the first of each header goes the normal way and is remembered
        assert np.array_equal(fast(data), reference(data))
    assert len(_JPEG_HEADERS.known) >= 3
    assert _JPEG_HEADERS.decode(jpegs[-1]) is not None, "a remembered header takes the fast path"
    for i in range(400):
        b = bytearray(rng.choice(jpegs))
        if i % 3 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        got, want = fast(bytes(b)), reference(bytes(b))
        if isinstance(want, type):
            assert got is want, f"case {i}: {got} vs {want}"
        else:
            assert np.array_equal(got, want), f"case {i}"
    png = io.BytesIO()
    Image.new("L", (8, 8), 7).save(png, format="PNG")
    assert np.array_equal(fast(png.getvalue()), reference(png.getvalue()))


def test_normalize_is_bit_identical_to_torch() -> None:
    from data_tools.loaders import _SCALE, _SHIFT

    u8 = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16).expand(2, 3, 16, 16).contiguous()
    reference = u8.to(torch.float32).mul_(_SCALE).add_(_SHIFT)
    assert torch.equal(normalize_batch(u8), reference)
    assert torch.equal(normalize_batch(u8[0]), reference[0])


def test_caption_token_cache_matches_tokenize(corpus: Path) -> None:
    from data_tools.loaders import _CaptionTokens

    tok = load_tokenizer(corpus)
    cache = _CaptionTokens(tok, 8, max_bytes=0)  # the smallest table: 1024 rows, overflows below
    for start in range(0, 2600, 300):
        texts = [f"caption {i % 1500} <pad> of {i % 7}" for i in range(start, start + 300)]
        assert torch.equal(cache(texts), tokenize(texts, 8, tok))
    many = [f"unique {i}" for i in range(1500)]  # more new captions than the table holds
    assert torch.equal(cache(many), tokenize(many, 8, tok))
    out = cache(["x", "y", "x"])
    out[:] = 0  # a batch never aliases the table
    assert torch.equal(cache(["x", "y", "x"]), tokenize(["x", "y", "x"], 8, tok))


def test_fast_jpeg_path_falls_back_when_pillow_internals_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another Pillow whose private decoder API moved: decoding goes on through the public path."""
    import numpy as np

    from data_tools import loaders
    from data_tools.synthetic import random_image

    headers = loaders._JpegHeaders()
    monkeypatch.setattr(loaders, "_JPEG_HEADERS", headers)
    buf = io.BytesIO()
    random_image(np.random.default_rng(1), 32, 32).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(loaders._open_image(data)), expected) and headers.known

    class Moved:  # PIL.Image as another Pillow might have it: no private _getdecoder
        def __getattr__(self, name: str) -> Any:
            if name == "_getdecoder":
                raise AttributeError(name)
            return getattr(Image, name)

    monkeypatch.setattr(loaders, "Image", Moved())
    for _ in range(2):
        assert np.array_equal(np.asarray(loaders._open_image(data)), expected)
    assert headers.known == [] and headers.MAX == 0
