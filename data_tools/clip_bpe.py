"""CLIP's standard BPE (49,408 ids) as a ``tokenizers`` tokenizer, built offline from the open_clip wheel.

open-clip-torch ships CLIP's merge list (``open_clip/bpe_simple_vocab_16e6.txt.gz``). Its tokenizer
(``open_clip.tokenizer.SimpleTokenizer``) is rebuilt here as a ``tokenizers.Tokenizer`` so that every
tokenizer of the project is one kind of object saved as one ``tokenizer.json``:

* vocabulary: the 256 byte symbols, the same with the end-of-word mark ``</w>``, one token per merge (the
  first 48,894 merges), then ``<start_of_text>`` (49,406) and ``<end_of_text>`` (49,407, the largest id:
  the text tower pools there); padding is id 0, as open_clip pads;
* words: CLIP's pattern (contractions, letter runs, single digits, punctuation runs) on the cleaned text,
  each word's bytes mapped to symbols, then BPE with ``</w>`` on the word's last symbol;
* cleaning (:func:`clean_text`, applied by ``data_tools.tokenizer.tokenize`` for a CLIP tokenizer):
  ftfy's ``fix_text``, HTML entities unescaped twice, whitespace collapsed, lower case.

:func:`is_clip` tells such a tokenizer from the corpus's trained byte-level BPE by its end-of-word mark.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from data_tools.atomic import atomic_write_text

__all__ = ["CLIP_VOCAB_SIZE", "bpe_file", "build_clip_tokenizer", "clean_text", "is_clip", "save_clip_tokenizer"]

CLIP_VOCAB_SIZE = 49408
END_OF_WORD = "</w>"
MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # the merges CLIP uses (the file holds more)
WORDS = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def bpe_file() -> Path:
    """The merge list inside the installed open_clip package (found without importing open_clip).

    Raises:
        FileNotFoundError: open-clip-torch is not installed, or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        if (Path(d) / BPE_NAME).is_file():
            return Path(d) / BPE_NAME
    raise FileNotFoundError(
        f"CLIP's BPE ({BPE_NAME}) ships in open-clip-torch, which is not installed here: "
        "pip install -c constraints.txt open-clip-torch (make venv does), or use data.tokenizer: corpus"
    )


def _byte_symbols() -> list[str]:
    """CLIP's (= GPT-2's) printable stand-in for each byte value, in CLIP's vocabulary order: the printable
    bytes (as themselves) first, then the others (as chr(256), chr(257), ... in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def build_clip_tokenizer(path: Path | None = None) -> Tokenizer:
    """CLIP's tokenizer from the merge list at ``path`` (default: open_clip's, :func:`bpe_file`)."""
    with gzip.open(path or bpe_file()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    if len(merges) != MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path or bpe_file()}: not CLIP's merge list ({len(merges)} merges, want {MERGES})")
    byte_syms = _byte_symbols()
    vocab_list = [*byte_syms, *(s + END_OF_WORD for s in byte_syms), *("".join(m) for m in merges)]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP's vocabulary came out with {len(vocab)} distinct tokens, want {CLIP_VOCAB_SIZE}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])  # already in the vocabulary: ids kept
    return tok


def save_clip_tokenizer(out: Path) -> Path:
    """Write CLIP's tokenizer as ``out`` (a tokenizer.json), atomically."""
    atomic_write_text(out, build_clip_tokenizer().to_str())
    return out


def is_clip(tok: Tokenizer) -> bool:
    """A CLIP-style BPE (end-of-word mark ``</w>``), as opposed to the corpus's byte-level BPE."""
    return getattr(tok.model, "end_of_word_suffix", None) == END_OF_WORD


def clean_text(text: str) -> str:
    """CLIP's cleaning before tokenization: ftfy's fix_text, HTML entities unescaped (twice), whitespace
    collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()
