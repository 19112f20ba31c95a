"""``python -m jobs export --format open_clip`` (issue #18): a folder open_clip loads and that computes our model.

Round trip through open-clip-torch 3.3.0 itself: ``create_model_and_transforms('local-dir:DIR')`` and
``get_tokenizer('local-dir:DIR')`` give our token ids, our image and text embeddings (real photos through
open_clip's own preprocessing) and our logit scale; the EMA is exported by default, the raw weights on
request; a shared cross-modal encoder, an unknown key and a non-empty --out are refused.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import model  # noqa: F401  -- the torchvision guard, before open_clip imports torchvision
from jobs.cli import main
from jobs.engine.checkpoint import save_checkpoint
from jobs.engine.tokens import text_sha256
from jobs.engine.train_state import TrainState
from model.clip import GrowCLIP, build_model
from model.export_open_clip import LOGIT_SCALE_MAX, ExportError, to_open_clip_state_dict
from model.spec import ArchSpec

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a cat",
    "a red circle above a blue square",
    "the digit 7, handwritten",
    "Émoji 😀 and 数字 in a caption",
    "a <end_of_text> inside a caption",  # ours removes literal special strings; so must the export
    "<start_of_text>",
    "",
    "word " * 40,  # truncated: still ends with end-of-text
]


def _spec(vocab_size: int, shared_depth: int = 0) -> ArchSpec:
    return ArchSpec.from_dict(
        {
            "image": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0},
            "text": {"vocab_size": vocab_size, "context_length": 16, "width": 32, "depth": 2, "heads": 2},
            "shared": {"width": 32, "depth": shared_depth, "heads": 2},
            "embed_dim": 16,
        }
    )


def _model(spec: ArchSpec, seed: int) -> GrowCLIP:
    """A tiny model with weights far from their init (a trained model is no more sensitive to its input)."""
    m = build_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1))
        m.logit_scale.fill_(math.log(30.0))
    return m.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DATA_ROOT with a trained byte-level BPE (the corpus tokenizer of every offline run)."""
    from data_tools.imaging import ImageOptions
    from data_tools.ingest import ingest
    from data_tools.synthetic import make_table_input
    from data_tools.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("export_corpus")
    root = tmp / "data"
    ingest(make_table_input(tmp / "pairs", 24, seed=5), "table", root, opts=ImageOptions(image_size=16))
    train_tokenizer(root, vocab_size=300)
    return root


def _checkpoint(path: Path, spec: ArchSpec, root: Path, *, ema: bool) -> Path:
    """A verified model-only checkpoint of ``_model(spec)``; its EMA (when ``ema``) differs from the weights."""
    m = _model(spec, seed=1)
    payload = TrainState(stage=1, spec=spec, model=m, config={"data": {"root": str(root)}}, growth_history=[])
    payload = payload.state_dict()
    g = torch.Generator().manual_seed(2)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    payload["ema"] = noisy if ema else None
    payload["tokenizer_sha256"] = text_sha256((root / "tokenizer.json").read_text())
    save_checkpoint(payload, path)
    return path


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["export", "--format", "open_clip", *args])
    return code, capsys.readouterr().err


def _vocab(root: Path) -> int:
    from data_tools.tokenizer import load_tokenizer

    return load_tokenizer(root).get_vocab_size()


@pytest.fixture(scope="module")
def exported(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, export folder) with the default weights (the EMA)."""
    import logging

    tmp = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(tmp / "final.pt", _spec(_vocab(corpus)), corpus, ema=True)
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    try:
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp / "oc")]) == 0
    finally:
        root_logger.handlers[:], root_logger.level = handlers, level
    return ckpt, tmp / "oc"


def _photos() -> list:
    """Real photos (scikit-learn's two 640x427 samples): uncut, and cut to landscape 3:2, portrait 2:3 and square.

    Our evaluation resizes and crops exactly as open_clip's transforms do (data_tools.imaging
    ``resize_shortest_and_crop``: torchvision's truncation of the long side included), so every aspect gives
    the same pixels on both sides.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    boxes = ((0, 0, 639, 426), (200, 0, 484, 426), (100, 0, 527, 427))
    return photos + [p.crop(box) for p in photos for box in boxes]


def test_open_clip_round_trip(exported: tuple[Path, Path], corpus: Path) -> None:
    from data_tools.eval_sets.stream import preprocess as eval_preprocess
    from data_tools.loaders import MEAN, STD, normalize_batch
    from data_tools.tokenizer import load_tokenizer, tokenize
    from jobs.engine.checkpoint import load_checkpoint

    ckpt, out = exported
    payload = load_checkpoint(ckpt)
    spec = ArchSpec.from_dict(payload["spec"])
    ours = build_model(spec)
    ours.load_state_dict(payload["ema"])  # the default export: the EMA
    ours.eval()
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    cfg = oc.visual.preprocess_cfg
    assert cfg["size"] == (32, 32) and (cfg["mean"], cfg["std"]) == (list(MEAN), list(STD)), cfg
    assert (cfg["interpolation"], cfg["resize_mode"]) == ("bicubic", "shortest"), cfg

    ids = tokenize(TEXTS, 16, load_tokenizer(corpus))
    theirs = tokenizer(TEXTS)
    assert torch.equal(theirs, ids), [t for t, a, b in zip(TEXTS, ids, theirs, strict=True) if not torch.equal(a, b)]
    # open_clip always cleans a text first (whitespace, HTML entities, ftfy); training captions are
    # whitespace-normalised at ingest, so ours sees what open_clip's cleaning makes of them
    messy = ["  two   spaces\tand a tab ", "fish &amp; chips"]
    assert torch.equal(tokenizer(messy), tokenize([" ".join(messy[0].split()), "fish & chips"], 16, corpus))

    photos = _photos()
    with torch.no_grad():
        a = ours.encode_image(normalize_batch(torch.stack([eval_preprocess(p, 32) for p in photos])))
        b = oc.encode_image(torch.stack([preprocess(p) for p in photos]), normalize=True)
        same_pixels = torch.stack([preprocess(p) for p in photos])
        exact = (ours.encode_image(same_pixels) * oc.encode_image(same_pixels, normalize=True)).sum(-1)
        text_cos = (ours.encode_text(ids) * oc.encode_text(theirs, normalize=True)).sum(-1)
        _, _, scale = ours(same_pixels[:1], ids[:1])
    assert exact.min() > 0.99999, f"the same function: {exact.tolist()}"
    assert text_cos.min() > 0.99999, text_cos.tolist()
    image_cos = (a * b).sum(-1)
    assert image_cos.min() > 0.999, f"ours vs open_clip's own preprocessing: {image_cos.tolist()}"
    assert sorted({p.size for p in photos}) == [(284, 426), (427, 427), (639, 426), (640, 427)]
    assert oc.logit_scale.exp().item() == pytest.approx(scale.item(), rel=1e-6)
    provenance = json.loads((out / "growclip_export.json").read_text())
    assert provenance["weights"] == "ema" and provenance["step"] == 0 and provenance["spec"] == spec.to_dict()


def test_hf_tokenizer_same_ids_on_any_text(exported: tuple[Path, Path], corpus: Path) -> None:
    """Literal special strings and odd whitespace, straight through transformers (no open_clip cleaning)."""
    from transformers import AutoTokenizer

    from data_tools.tokenizer import load_tokenizer, tokenize

    rng = random.Random(0)
    pieces = ["a", "cat", " ", "  ", "\n", "\t", "\x1c", "\u3000", "<pad>", "<end_of_text>", "<start_of_text>", "<"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(400)]
    hf = AutoTokenizer.from_pretrained(str(exported[1]))
    theirs = hf(texts, return_tensors="pt", max_length=16, padding="max_length", truncation=True).input_ids
    ours = tokenize(texts, 16, load_tokenizer(corpus))
    assert torch.equal(theirs, ours), [t for t, a, b in zip(texts, ours, theirs, strict=True) if not torch.equal(a, b)]


def _exported_tensor(out: Path, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(out / "open_clip_model.safetensors"))[key]


def test_weights_ema_by_default_raw_on_request(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    from jobs.engine.checkpoint import load_checkpoint

    spec = _spec(_vocab(corpus))
    ckpt = _checkpoint(tmp_path / "with_ema.pt", spec, corpus, ema=True)
    payload = load_checkpoint(ckpt)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    for args, source in (([], "ema"), (["--weights", "ema"], "ema"), (["--weights", "raw"], "model")):
        out = tmp_path / f"out_{source}_{len(args)}"
        code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out), *args)
        assert code == 0, err
        assert f"weights={'ema' if source == 'ema' else 'raw'}" in err
        assert torch.equal(_exported_tensor(out, key), to_open_clip_state_dict(payload[source], spec)[key])
    no_ema = _checkpoint(tmp_path / "no_ema.pt", spec, corpus, ema=False)
    code, err = _export(capsys, "--checkpoint", str(no_ema), "--out", str(tmp_path / "raw"))
    assert code == 0 and json.loads((tmp_path / "raw" / "growclip_export.json").read_text())["weights"] == "raw"
    code, err = _export(capsys, "--checkpoint", str(no_ema), "--out", str(tmp_path / "none"), "--weights", "ema")
    assert code == 2 and "no EMA" in err and "--weights raw" in err and not (tmp_path / "none").exists()


def test_shared_encoder_refused(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    ckpt = _checkpoint(tmp_path / "shared.pt", _spec(_vocab(corpus), shared_depth=1), corpus, ema=False)
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "oc"))
    assert code == 2 and "shared cross-modal encoder (shared.depth=1" in err and "shared_depth" in err, err
    assert not (tmp_path / "oc").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "shared.pt",
        "shared.pt.sha256",
    ]


def test_mapping_refuses_unknown_keys_and_clamps_the_scale(corpus: Path) -> None:
    spec = _spec(_vocab(corpus))
    sd = _model(spec, seed=3).state_dict()
    sd["logit_scale"] = torch.tensor(5.0)  # exp(5) = 148: our forward uses 100
    out = to_open_clip_state_dict(sd, spec)
    assert out["logit_scale"].item() == pytest.approx(LOGIT_SCALE_MAX)
    pos = sd["visual.pos_embed"][0]
    assert torch.equal(out["visual.positional_embedding"][0], pos[0])  # the class token: no patch bias
    assert torch.allclose(out["visual.positional_embedding"][1:], pos[1:] + sd["visual.patch_embed.proj.bias"])
    with pytest.raises(KeyError, match=r"no rule for 'visual.resblocks.0.attn.q_norm.weight'"):
        to_open_clip_state_dict({**sd, "visual.resblocks.0.attn.q_norm.weight": torch.ones(16)}, spec)
    with pytest.raises(KeyError, match=r"missing \['text.resblocks.1"):
        to_open_clip_state_dict({k: v for k, v in sd.items() if not k.startswith("text.resblocks.1.")}, spec)
    with pytest.raises(ExportError, match="shared cross-modal encoder"):
        to_open_clip_state_dict(sd, _spec(spec.text.vocab_size, shared_depth=2))


def test_out_must_be_new_or_empty_unless_force(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    ckpt = exported[0]
    out = tmp_path / "oc"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out))
    assert code == 2 and "not empty" in err and "--force" in err and (out / "keep.txt").read_text() == "mine"
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out), "--force")  # not an export: kept
    assert code == 2 and "not an earlier export" in err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert _export(capsys, "--checkpoint", str(ckpt), "--out", str(out))[0] == 0
    (out / "stale.txt").write_text("from an earlier export")
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out), "--force")  # an earlier export
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "open_clip_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oc"], "no temp folder left behind"
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(ckpt.parent), "--force")
    assert code == 2 and "holds the checkpoint" in err and ckpt.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(capsys, "--checkpoint", str(ckpt), "--out", str(empty))[0] == 0


def test_clip_bpe_tokenizer_exports_with_clips_cleaning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    """A run on CLIP's BPE (data.tokenizer: clip): open_clip cleans as CLIP does (lower case, ftfy, HTML), and
    so do we; the exported tokenizer gives our ids, and CLIP's own tokenizer's where a text holds no literal
    special string (open_clip's SimpleTokenizer would encode one as a special token)."""
    from data_tools.clip_bpe import CLIP_VOCAB_SIZE, save_clip_tokenizer
    from data_tools.tokenizer import tokenize

    tok_file = save_clip_tokenizer(tmp_path / "run" / "tokenizer.json")
    spec = _spec(CLIP_VOCAB_SIZE)
    payload = TrainState(stage=1, spec=spec, model=_model(spec, 4), config={}, growth_history=[]).state_dict()
    payload["tokenizer_sha256"] = text_sha256(tok_file.read_text())
    ckpt = tmp_path / "run" / "stage_01" / "train" / "final.pt"
    save_checkpoint(payload, ckpt)
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "oc"))  # finds the run's
    assert code == 0, err
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"] == {"clean": "lower"}
    texts = [*TEXTS, "Caf&eacute; &amp; CRÈME brûlée!!", "  Multiple   spaces\tand\nnewlines "]
    ours = tokenize(texts, 16, tok_file)
    theirs = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(texts)
    assert torch.equal(theirs, ours), [t for t, a, b in zip(texts, ours, theirs, strict=True) if not torch.equal(a, b)]
    plain = [t for t in texts if "_of_text>" not in t]
    assert torch.equal(open_clip.get_tokenizer("ViT-B-32")(plain, context_length=16), tokenize(plain, 16, tok_file))
