"""build-offline --growth iid|domains (issue #15 item 3): disjoint growing samples of one pool; domains unchanged."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_tools.corpus_pool import POOL, allocate, source_items, stage_counts, stage_pairs
from data_tools.manifest import load_manifest
from data_tools.offline import build_offline, resolve_stage_sizes
from data_tools.offline_sources import (
    HEART,
    digit_heldout,
    emoji_heldout,
    mnist5k,
    pixel_hash,
    sk_digits,
)
from data_tools.offline_sources import check_sources as _check_sources
from data_tools.validate import validate
from tests.helpers import tar_samples

MISSING = _check_sources()
pytestmark = pytest.mark.skipif(bool(MISSING), reason="offline sources missing: " + "; ".join(MISSING))

SIZES = [100, 200, 300]
BUILD = {"eval_per_task": 20, "image_size": 16, "workers": 1, "vocab_size": 0}


@pytest.fixture(scope="module")
def iid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("iid") / "data"
    return root, build_offline(root, growth="iid", stage_sizes=SIZES, **BUILD)


def stage_samples(root: Path) -> dict[int, list[dict[str, bytes]]]:
    out = {}
    for entry in load_manifest(root)["stages"]:
        out[entry["stage"]] = [s for sh in entry["shards"] for s in tar_samples(root / sh["name"]).values()]
    return out


def shard_digests(root: Path) -> list[str]:
    return [sh["sha256"] for e in load_manifest(root)["stages"] for sh in e["shards"]]


# ------------------------------------------------------------------------------------------- iid
def test_iid_sizes_grow_as_asked(iid: tuple[Path, dict]) -> None:
    root, summary = iid
    assert summary["growth"] == "iid" and summary["stage_sizes"] == SIZES
    for t, n in enumerate(SIZES, start=1):
        kept = summary["stages"][t]["kept"]
        assert summary["stages"][t]["requested"] == n and abs(kept - n) <= 0.02 * n, (t, kept, n)
    entries = load_manifest(root)["stages"]
    assert [e["count"] for e in entries] == [summary["stages"][t]["kept"] for t in (1, 2, 3)]
    assert all(e["sources"][0]["path"].startswith("offline:iid:seed=0:stage_sizes=100,200,300:") for e in entries)
    report = validate(root)
    assert report.ok, report.render()


def test_iid_stages_are_disjoint(iid: tuple[Path, dict]) -> None:
    root, _ = iid
    pixels, pairs = {}, {}
    for t, samples in stage_samples(root).items():
        metas = [json.loads(s["json"]) for s in samples]
        pixels[t] = {m["pixel_sha256"] for m in metas}
        pairs[t] = {(m["pixel_sha256"], s["txt"]) for m, s in zip(metas, samples, strict=True)}
        assert len(pixels[t]) == len(samples), f"stage {t} repeats an image"
    for a in pixels:
        for b in pixels:
            if a < b:
                assert not pixels[a] & pixels[b], (a, b)
                assert not pairs[a] & pairs[b], (a, b)
    # the finite sources walk one permutation of their images: no base image in two stages
    bases: dict[str, dict[int, set[int]]] = defaultdict(dict)
    for t in (1, 2, 3):
        items = list(stage_pairs(SIZES, t, 0, set()))
        assert {pixel_hash(p.image) for p in items} == pixels[t], "the generator is what was ingested"
        for source in ("fashion-mnist", "mnist-5k", "sklearn-digits"):
            bases[source][t] = {int(p.meta["base"]) for p in items if p.meta["source"] == source}
    for source, per_stage in bases.items():
        assert sum(map(len, per_stage.values())) == len(set().union(*per_stage.values())), source


def test_every_source_in_every_stage(iid: tuple[Path, dict]) -> None:
    root, summary = iid
    names = [s.name for s in POOL]
    shards = stage_samples(root)
    for t, n in enumerate(SIZES, start=1):
        stage = summary["stages"][t]
        assert stage["sources"] == names and set(stage["per_source"]) == set(names)
        urls = [json.loads(s["json"])["url"] for s in shards[t]]  # offline-pool://SOURCE/ITEM
        assert Counter(u.split("/")[2] for u in urls) == stage["per_source"]
        first = [u.split("/")[2] for u in urls[: n // 4]]
        assert len(set(first)) >= 6, f"stage {t}: the first shard rows are not a mixture: {Counter(first)}"
        for source in POOL:  # the same mixture at every size
            count = stage["per_source"][source.name]
            assert count >= 1 and abs(count / n - source.share) <= 1 / n + 1e-9, (t, source.name, count)
    assert summary["pool"] == {s.name: s.share for s in POOL}


def test_allocation_sums_and_keeps_every_source() -> None:
    shares = [s.share for s in POOL]
    for n in (10, 37, 100, 3001, 12000):
        counts = allocate(n, shares)
        assert sum(counts) == n and min(counts) >= 1, (n, counts)
    assert [sum(c.values()) for c in stage_counts([3000, 6000, 12000])] == [3000, 6000, 12000]


def test_caption_phrasings_vary() -> None:
    for source in POOL:
        items = list(source_items(source, 0, 0, 60))
        caps = [p.caption for p in items]
        assert len(set(caps)) >= 50, (source.name, caps[:5])
        starts = {" ".join(c.split()[:2]) for c in caps}
        assert len(starts) >= 4, (source.name, starts)
    # one concept, several phrasings: a (colour, shape) is captioned in different ways
    by_concept = defaultdict(set)
    for p in source_items(next(s for s in POOL if s.name == "shapes"), 0, 0, 400):
        by_concept[(p.meta["colour"], p.meta["kind"])].add(p.caption)
    assert max(map(len, by_concept.values())) >= 5
    relations = [p.caption for p in source_items(next(s for s in POOL if s.name == "emoji-relations"), 0, 0, 100)]
    assert any(" left of " in c for c in relations) and any(" right of " in c for c in relations)


def test_iid_is_deterministic(iid: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = iid
    again = tmp_path / "again"
    build_offline(again, growth="iid", stage_sizes=SIZES, **BUILD)
    assert shard_digests(again) == shard_digests(root)
    other = {pixel_hash(p.image) for p in stage_pairs(SIZES, 1, 1, set())}
    assert len(other & {pixel_hash(p.image) for p in stage_pairs(SIZES, 1, 0, set())}) < 5, "--seed changes the sample"


def test_adding_a_stage_keeps_the_earlier_ones(tmp_path: Path) -> None:
    small = {**BUILD, "eval_per_task": 10}
    grown, direct = tmp_path / "grown", tmp_path / "direct"
    build_offline(grown, growth="iid", stage_sizes=[30, 40], **small)
    before = shard_digests(grown)
    summary = build_offline(grown, growth="iid", stage_sizes=[30, 40, 50], **small)
    assert list(summary["stages"]) == [3] and shard_digests(grown)[:2] == before
    build_offline(direct, growth="iid", stage_sizes=[30, 40, 50], **small)
    assert shard_digests(direct) == shard_digests(grown), "stage t depends only on the seed and sizes[:t]"


def test_eval_suite_is_disjoint_from_the_pool(iid: tuple[Path, dict]) -> None:
    root, _ = iid
    train_jpgs = {json.loads(s["json"])["jpg_sha256"] for ss in stage_samples(root).values() for s in ss}
    for task in sorted(p.name for p in (root / "eval").iterdir() if p.is_dir()):
        samples = tar_samples(root / "eval" / task / "test/0.tar").values()
        assert not {hashlib.sha256(s["jpg"]).hexdigest() for s in samples} & train_jpgs, task
    # held-out code points (emoji_category, emoji_spatial, emoji_retrieval) and indices never enter the pool
    held = {"mnist-5k": ("mnist", mnist5k()[1]), "sklearn-digits": ("digits", sk_digits()[1])}
    for source in POOL:
        for p in source_items(source, 0, 0, 150):
            assert all(cp == HEART or not emoji_heldout(cp) for cp in p.meta.get("cps", [])), source.name
            if source.name in held:
                name, labels = held[source.name]
                assert not digit_heldout(name, int(p.meta["base"]), labels), (source.name, p.meta)


# ----------------------------------------------------------------------------------- flags, refusals
def test_stage_sizes_from_flags() -> None:
    assert resolve_stage_sizes(stages=None, pairs_per_stage=3000, stage_sizes=None, growth_factor=1.0) == [3000] * 3
    assert resolve_stage_sizes(stages=4, pairs_per_stage=100, stage_sizes=None, growth_factor=2.0) == [
        100,
        200,
        400,
        800,
    ]
    assert resolve_stage_sizes(stages=None, pairs_per_stage=1, stage_sizes=[30, 60], growth_factor=1.0) == [30, 60]
    bad = [
        ({"stages": 3, "stage_sizes": [30, 60]}, "--stages 3 disagrees"),
        ({"stage_sizes": [30, 60], "growth_factor": 2.0}, "give one of them"),
        ({"growth_factor": 0.0}, "positive"),
        ({"growth_factor": float("nan")}, "positive"),
        ({"stage_sizes": [30, 5]}, "5 pairs is too small"),
        ({"stage_sizes": []}, "empty"),
    ]
    for kwargs, message in bad:
        args = {"stages": None, "pairs_per_stage": 100, "stage_sizes": None, "growth_factor": 1.0, **kwargs}
        with pytest.raises(ValueError, match=message):
            resolve_stage_sizes(**args)


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_tools.cli import main as cli_main

    root = str(tmp_path / "data")
    for argv in (["--stage-sizes", "30,6x"], ["--growth", "sideways"]):  # argument errors
        with pytest.raises(SystemExit) as exc:
            cli_main(["build-offline", root, *argv])
        assert exc.value.code == 2, argv
    assert cli_main(["build-offline", root, "--growth", "iid", "--stage-sizes", "30,60", "--stages", "3"]) == 2
    assert cli_main(["build-offline", root, "--growth", "domains", "--stage-sizes", "30,60"]) == 2  # >= 3 stages
    err = capsys.readouterr().err
    assert "not comma-separated pair counts" in err and "at least 3 stages" in err and "disagrees" in err
    assert not (tmp_path / "data").exists()


def test_rerun_refuses_another_mode_seed_or_sizes(iid: tuple[Path, dict]) -> None:
    root, _ = iid
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="holds an iid corpus"):
        build_offline(root, growth="domains", **BUILD)
    with pytest.raises(ValueError, match="was built with --seed 0 --stage-sizes 100,200"):
        build_offline(root, growth="iid", stage_sizes=[100, 250, 300], **BUILD)
    with pytest.raises(ValueError, match="--seed 1"):
        build_offline(root, growth="iid", stage_sizes=SIZES, seed=1, **BUILD)
    assert (root / "manifest.json").read_bytes() == before
    assert build_offline(root, growth="iid", stage_sizes=SIZES, **BUILD)["stages"] == {}


# --------------------------------------------------------------------------------------- domains
# sha256 of a tiny domains build recorded before issue #15 (pillow 13.0.0, numpy 2.4.6, tokenizers 0.23.3
# from constraints.txt): --growth domains must stay byte-for-byte the corpus it was. Re-record only on
# purpose (a pinned version or a Debian source changed), never to make a generator change pass.
DOMAINS_SHA256 = {
    # issue #19 added the stages' "image" entry and options.reencode; without them the manifest is byte-identical
    "manifest.json": "acbd7b45f90e6bf11b3efb4bd2752dad7fd2f2ebe010ecc69043e32d59ce601d",
    "tokenizer.json": "1fe146e926612b11135459caa230c49530bf3109b342a365ed76e46dfce1a7f1",
    "shards/stage_01/000000.tar": "d8fa75500f451992b834138709de59ff1803e7d0eacdca285885eeb03f242bbd",
    "shards/stage_01/hashes.txt": "70d6f5d49d0d4179098d89e68160aaa0852acd6a46d035362f7415a2fd58e4ff",
    "shards/stage_02/000000.tar": "c0ef5f6de15725987f86c2429061cf8b0dd2647ea5e4b958ed1473b6b49d060a",
    "shards/stage_02/hashes.txt": "ecb361f334dadc778f12321d5a8ddc89c9258834d123bc7ba4896e743e1ccb82",
    "shards/stage_03/000000.tar": "6a59b9b7208a3a9294a29efadbb1a72d69b426e49aa8c6b86c01a67ff4524b12",
    "shards/stage_03/hashes.txt": "edc570a1ec213bf066bbf97b11d6f8bf4893390c5d1e207370c22673c4bd7e85",
    "shards/stage_04/000000.tar": "1fd9f4fbcb7b8a797322ac697051116fe14fa826a267ab89c9c32481316ab75e",
    "shards/stage_04/hashes.txt": "b609eb7e678a4d4fbfafc067fb4c5111666f6ddcdf8b2fb3d3be031eb0498c8d",
    "eval/colour_shape/test/0.tar": "50de9f03e37af339c40af304e387a482cfa8ea7f3764feb187a6e881d8bf6140",
    "eval/digits/test/0.tar": "7ebdf424da150c1ef34c284b7c1228eaaef870fd4299dba2fe575645103d9b47",
    "eval/emoji_category/test/0.tar": "daaa6cb4a50af1e4ab7a20090879c79b91b28032d2d53e61f6ee789c34a8b73d",
    "eval/emoji_retrieval/test/0.tar": "f111c3e36b325095ed98c412b076b6ac33959e083f52f5d14a47b879c4b7fb96",
    "eval/emoji_spatial/test/0.tar": "ca2fe19d98fde59efe34c4b77d32166b63725c09147ea19d2baee98b775d5623",
    "eval/fashion_mnist/test/0.tar": "ec1a8d6d0ebee2a2c2311de797c4cb678f6f4dff63bfa415887c3d4ed01fc360",
    "eval/mnist/test/0.tar": "c919ebf15fe1c685f65d813c3288f1f96e96f0db21165d753842bf7a9f319e33",
}


def test_domains_corpus_is_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "domains"
    summary = build_offline(
        root, growth="domains", stages=4, pairs_per_stage=60, eval_per_task=20, image_size=16, workers=1, vocab_size=300
    )
    assert summary["growth"] == "domains" and summary["stage_sizes"] == [60] * 4
    got = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in DOMAINS_SHA256}
    changed = sorted(rel for rel in DOMAINS_SHA256 if got[rel] != DOMAINS_SHA256[rel])
    assert not changed, f"the domains corpus changed: {changed}"


def test_pool_items_do_not_depend_on_order() -> None:
    # item i of a source is drawn from its own seed: generating 10..19 alone gives the same images
    source = next(s for s in POOL if s.name == "mixed-relations")
    whole = [pixel_hash(p.image) for p in source_items(source, 0, 0, 20)]
    part = [pixel_hash(p.image) for p in source_items(source, 0, 10, 10)]
    assert whole[10:] == part
    assert np.unique(whole).size == 20
