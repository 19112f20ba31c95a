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
from data_tools.eval_sets import eval_batches, find_eval_tasks, load_eval_task
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
    assert "eval task toy: read 3 samples, skipped {'missing_part': 1, 'shard_read_error': 1}" in caplog.text
    if kind == "classification":
        assert task.labels.tolist() == [0, 1, 0]
    else:
        assert task.captions == [[value.format(i % 2)] for i in range(3)]


def test_eval_task_keeps_the_samples_after_a_damaged_header(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A header whose checksum fails costs its one member, in an eval set too (webdataset's own tar iterator, which
    the eval reader used before issue #19, ended the shard there: samples 2-4 were lost without a word)."""
    tdir = tmp_path / "toy"
    (tdir / "test").mkdir(parents=True)
    write_tar(
        tdir / "test" / "0.tar", [{"__key__": f"{i:06d}", "jpg": _jpeg((40 * i, 0, 0)), "cls": "0"} for i in range(5)]
    )
    (tdir / "test" / "nshards.txt").write_text("1\n")
    (tdir / "classnames.txt").write_text("a\n")
    (tdir / "zeroshot_classification_templates.txt").write_text("a photo of {c}\n")
    with tarfile.open(tdir / "test" / "0.tar") as tf:
        offset = tf.getmember("000001.cls").offset
    data = bytearray((tdir / "test" / "0.tar").read_bytes())
    data[offset + 3] ^= 0x55
    (tdir / "test" / "0.tar").write_bytes(bytes(data))
    (images, labels), *rest = eval_batches(find_eval_tasks(None, [tdir])["toy"], 16, 8)
    reds = [round(float(img[0].mean() * STD[0] + MEAN[0]) * 255 / 40) for img in images]
    assert not rest and reds == [0, 2, 3, 4] and labels.tolist() == [0] * 4
    assert "eval task toy: read 4 samples, skipped {'missing_part': 1}" in caplog.text


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


# --- the one shard reader and sample decode (data_tools.shard_reader, issue #19 item 5) ---


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, odd: bool = False) -> bytes:
    """A tar of ``members`` (name, data), with the odd members real tars have when ``odd``: a directory, a link,
    a meta file and a nested name (none of them a sample's part)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:

        def add(name: str, data: bytes = b"", **kw: Any) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 946684800
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)

        if odd:
            add("dir", type=tarfile.DIRTYPE)
            add("__meta__.json", b"{}")
            add("link.txt", type=tarfile.SYMTYPE, linkname="x")
        for name, data in members:
            add(name, data)
    return buf.getvalue()


def _read(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """``read_shard``'s samples and, for each read error, how many samples had come before it."""
    from data_tools.shard_reader import read_shard

    out: list[dict[str, Any]] = []
    errors: list[int] = []

    def handler(exc: BaseException) -> bool:
        errors.append(len(out))
        return True

    out.extend(read_shard(str(path), handler))
    return out, errors


_PARTS = [(f"s01_{i:04d}", f"{ext}", bytes([i]) * (100 + 300 * i)) for i in range(6) for ext in ("jpg", "txt")]


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_read_shard_keeps_everything_but_the_damage(tmp_path: Path, fmt: str) -> None:
    """The guarantees of docs/reliability.md at the reader: a damaged header costs that one member, zero or junk
    blocks cost nothing, a cut keeps every sample before it with one read error; never raises."""
    import gzip

    fmt_id = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    clean = _tar([(f"{k}.{e}", d) for k, e, d in _PARTS], fmt_id, odd=True)
    whole = [{"__key__": k, "jpg": bytes([i]) * (100 + 300 * i), "txt": bytes([i]) * (100 + 300 * i)}
             for i, k in enumerate(f"s01_{i:04d}" for i in range(6))]  # fmt: skip
    path = tmp_path / "000000.tar"

    def read(data: bytes) -> tuple[list[dict[str, Any]], list[int]]:
        path.write_bytes(data)
        samples, errors = _read(path)
        assert all(s.pop("__url__") == str(path) for s in samples)
        return samples, errors

    assert read(clean) == (whole, [])
    assert read(gzip.compress(clean, mtime=0)) == (whole, [])
    with tarfile.open(fileobj=io.BytesIO(clean)) as tf:
        at = {m.name: m for m in tf.getmembers()}
    txt2 = at["s01_0002.txt"]
    damaged = bytearray(clean)
    damaged[txt2.offset + 3] ^= 0x55  # its checksum no longer matches: that header is skipped
    assert read(bytes(damaged)) == ([*whole[:2], {"__key__": "s01_0002", "jpg": whole[2]["jpg"]}, *whole[3:]], [])
    jpg3 = at["s01_0003.jpg"]
    for fill in (bytes(1024), bytes(range(256)) * 2):  # zero blocks, a junk block between two members
        assert read(clean[: jpg3.offset] + fill + clean[jpg3.offset :]) == (whole, [])
    # a cut in sample 3's image: counted when it comes, before sample 2 (complete only then) is handed on
    assert read(clean[: jpg3.offset_data + 50]) == (whole[:3], [2])
    end2 = at["s01_0002.txt"].offset_data + at["s01_0002.txt"].size
    samples, errors = read(clean[: end2 + 1])  # a cut in the padding after sample 2's last member
    assert samples == whole[:3] and len(errors) <= 1
    for junk in (b"", b"\x01" * 100, b"\x01" * 2048, bytes(4096)):  # empty, not a tar, zeros only
        assert read(junk) == ([], [0])
    assert _read(tmp_path / "missing.tar") == ([], [0])


def test_read_shard_groups_like_webdataset(tmp_path: Path) -> None:
    """Keys and extensions as webdataset's group_by_keys: lower-case extensions, dotted extensions, nested names;
    a repeated extension is a read error and the first one is kept."""
    members = [("a.JPG", b"1"), ("a.seg.txt", b"2"), ("sub/dir/b.txt", b"3"), ("c.txt", b"4"), ("c.txt", b"5"),
               ("noext", b"6"), ("d.txt", b"7")]  # fmt: skip
    (tmp_path / "s.tar").write_bytes(_tar(members))
    samples, errors = _read(tmp_path / "s.tar")
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in samples] == [
        {"__key__": "a", "jpg": b"1", "seg.txt": b"2"},
        {"__key__": "sub/dir/b", "txt": b"3"},
        {"__key__": "c", "txt": b"4"},
        {"__key__": "d", "txt": b"7"},
    ]
    assert errors == [2]


def test_skip_counter_counts_logs_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    import pickle

    from data_tools.shard_reader import READ_ERROR, SkipCounter

    skips = SkipCounter("somewhere")
    for i in range(5):
        skips.count("image_decode_error", f"bad {i}")
    assert skips(ValueError("torn", None, None)) is True  # webdataset's handler protocol: go on
    assert skips.counts == {"image_decode_error": 5, READ_ERROR: 1} and skips.last == READ_ERROR
    logged = [r.getMessage() for r in caplog.records]
    assert [m.split(": ", 2)[2] for m in logged] == ["bad 0", "bad 1", "bad 3", "torn"]  # 1st, 2nd, 4th; 1st
    assert logged[0] == "somewhere: skipped (image_decode_error, 1 so far): bad 0"
    assert skips.take() == {"image_decode_error": 5, READ_ERROR: 1} and skips.take() == {}
    skips.count("missing_part")
    again = pickle.loads(pickle.dumps(skips))  # travels into DataLoader workers
    assert again.take() == {"missing_part": 1} and again.counts == skips.counts


def _encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_sample_reasons_in_order_and_image_formats() -> None:
    import numpy as np

    from data_tools.shard_reader import MAX_CAPTION_BYTES, Decoded, Skipped, decode_sample
    from data_tools.synthetic import random_image

    img = random_image(np.random.default_rng(0), 20, 16)
    jpg = _encoded(img, "JPEG", quality=90)

    def reason(sample: dict[str, Any], **kw: Any) -> str:
        got = decode_sample({"__key__": "k", **sample}, **kw)
        return got.reason if isinstance(got, Skipped) else "ok"

    got = decode_sample({"__key__": "k", "jpg": jpg, "txt": b"a caption"})
    assert isinstance(got, Decoded) and got.text == "a caption" and got.ext == "jpg" and got.image.mode == "RGB"
    assert np.array_equal(np.asarray(got.image), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))
    assert reason({"txt": b"x"}) == reason({"jpg": jpg}) == reason({"json": b"{}"}) == "missing_part"
    assert reason({"jpg": b"junk", "txt": b"\xff\xfe"}) == "caption_decode_error", "the caption is checked first"
    assert reason({"jpg": jpg, "txt": b"a \x00 b"}) == "caption_binary"
    assert reason({"jpg": jpg, "txt": b" \n\t"}) == "caption_empty"
    assert reason({"jpg": jpg, "txt": b"x" * (MAX_CAPTION_BYTES + 1)}) == "caption_too_long"
    assert reason({"jpg": jpg, "txt": "tab\tok, é".encode()}) == "ok"
    assert (
        reason({"jpg": jpg[: len(jpg) // 2], "txt": b"x"}) == reason({"jpg": b"", "txt": b"x"}) == "image_decode_error"
    )
    # eval sets: any of CLIP_benchmark's image members (the first of webp, png, jpg, jpeg), a label part instead
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 128))
    for ext, data in (("webp", _encoded(rgba, "WEBP", lossless=True)), ("png", _encoded(rgba, "PNG")),
                      ("jpeg", _encoded(img.convert("L"), "JPEG"))):  # fmt: skip
        got = decode_sample({"__key__": "k", ext: data, "cls": b"1"}, caption=False, parts=("cls",))
        assert isinstance(got, Decoded) and got.ext == ext and got.image.mode == "RGB" and got.text is None
        assert np.array_equal(np.asarray(got.image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    both = decode_sample({"__key__": "k", "jpg": jpg, "webp": _encoded(img, "WEBP"), "txt": b"x"})
    assert isinstance(both, Decoded) and both.ext == "webp"
    assert reason({"png": _encoded(rgba, "PNG")}, caption=False, parts=("cls",)) == "missing_part"


def test_decode_sample_fails_exactly_where_pillow_does() -> None:
    """Mutated and truncated JPEGs: ``image_decode_error`` exactly where Image.open + load + convert raises, the
    same pixels where it does not."""
    import random

    import numpy as np

    from data_tools.shard_reader import Decoded, decode_sample
    from data_tools.synthetic import random_image

    def reference(data: bytes) -> Any:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            return np.asarray(img.convert("RGB"))
        except Exception:
            return None

    rng, nprng = random.Random(0), np.random.default_rng(0)
    jpegs = [_encoded(random_image(nprng, *size), "JPEG", quality=q) for size, q in [((32, 32), 90), ((40, 24), 95)]]
    failures = 0
    for i in range(300):
        b = bytearray(rng.choice(jpegs))
        if i % 3 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        got, want = decode_sample({"__key__": "k", "jpg": bytes(b), "txt": b"x"}), reference(bytes(b))
        if want is None:
            assert not isinstance(got, Decoded) and got.reason == "image_decode_error", f"case {i}"
            failures += 1
        else:
            assert isinstance(got, Decoded) and np.array_equal(np.asarray(got.image), want), f"case {i}"
    assert 0 < failures < 300


def test_augmented_batches_depend_on_the_seed_only_and_leave_torch_rng_alone(corpus: Path) -> None:
    """torchvision's crop draws from torch's global generator: seeded per batch from the reader's own seed, the
    caller's generator state is left as it was (num_workers=0 runs the reader in this process)."""
    kw = {"batch_size": 8, "image_size": 24, "context_length": 8, "shuffle_buffer": 8, "crop_scale": (0.3, 1.0)}

    def first(seed: int, **more: Any) -> torch.Tensor:
        return next(iter(make_train_loader(corpus, [1, 2], seed=seed, **kw, **more))).images

    it = iter(make_train_loader(corpus, [1, 2], seed=5, **kw))
    next(it)  # the DataLoader itself draws a base seed from torch's generator when its iterator starts
    state = torch.get_rng_state()
    next(it)
    assert torch.equal(torch.get_rng_state(), state), "the reader moved the caller's torch RNG"
    a = first(5, flip=True)
    assert torch.equal(a, first(5, flip=True))
    assert not torch.equal(a, first(6, flip=True))
    assert not torch.equal(a, first(5, augment=False)), "the crop is applied"
    assert torch.equal(first(5, num_workers=2), first(5, num_workers=2)), "workers: a function of seed and worker"


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
