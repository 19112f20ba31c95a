"""Tokenizer round trip and the loaders: shapes, replay mix, held-out split, error counting (issue #4)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import data_tools
from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest, write_tar
from data_tools.loaders import is_heldout, make_train_loader, make_val_loader, stage_weights
from data_tools.manifest import load_manifest, save_manifest, sha256_file
from data_tools.synthetic import make_table_input
from data_tools.tokenizer import load_tokenizer, special_ids, tokenize, train_tokenizer


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
