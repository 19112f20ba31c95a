"""CLIP's standard BPE (data_tools/clip_bpe.py, issue #18): the same ids as open_clip's own tokenizer."""

from __future__ import annotations

import pytest
import torch

import model  # noqa: F401  -- the torchvision guard, before open_clip imports torchvision
from data_tools.clip_bpe import CLIP_VOCAB_SIZE, build_clip_tokenizer, is_clip
from data_tools.tokenizer import special_ids, tokenize

TEXTS = [
    "a photo of a Dog.",
    "Caf&eacute; &amp; crème brûlée!!",
    "  Multiple   spaces\tand\nnewlines ",
    "I'm 1234 years old, it's 3.14",
    "数字 and émojis 😀👍",
    "UPPER lower MiXeD",
    "don't stop-believing... (really)?",
    "",
    "ﬁne ligature Ａｂｃ",
    "a red circle above a blue square " * 20,  # truncated: still ends with end-of-text
]


@pytest.fixture(scope="module")
def clip_tok():  # type: ignore[no-untyped-def]
    return build_clip_tokenizer()


def test_clip_bpe_equals_open_clip(clip_tok) -> None:  # type: ignore[no-untyped-def]
    import open_clip

    assert clip_tok.get_vocab_size() == CLIP_VOCAB_SIZE and is_clip(clip_tok)
    assert special_ids(clip_tok) == {"pad": 0, "sot": 49406, "eot": 49407}
    for length in (77, 16):
        ours = tokenize(TEXTS, length, clip_tok)
        theirs = open_clip.get_tokenizer("ViT-B-32")(TEXTS, context_length=length)
        diff = [t for t, a, b in zip(TEXTS, ours, theirs, strict=True) if not torch.equal(a, b)]
        assert not diff, diff


def test_clip_bpe_round_trips_through_tokenizer_json(clip_tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Saved and loaded like every tokenizer of the project; literal special strings are removed (open_clip
    would encode them as specials and pool at the wrong place)."""
    from data_tools.clip_bpe import save_clip_tokenizer
    from data_tools.tokenizer import load_tokenizer

    back = load_tokenizer(save_clip_tokenizer(tmp_path / "tokenizer.json"))
    assert is_clip(back) and torch.equal(tokenize(TEXTS, 77, back), tokenize(TEXTS, 77, clip_tok))
    row = tokenize("<end_of_text> inside", 8, back)[0].tolist()
    assert row.count(49407) == 1 and row[:3] == [49406, tokenize("inside", 3, back)[0, 1].item(), 49407]
