"""Tokenizer round trip and the loaders: shapes, replay mix, held-out split, error counting (issue #4)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import data_tools
from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest, write_tar
from data_tools.loaders import (
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
