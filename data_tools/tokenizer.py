"""Byte-level BPE tokenizer trained on the first stage's captions (no pretrained tokenizer is reachable).

Special tokens and ids:
  * ``<pad>`` = 0: padding, so a padded row is ``[sot, ..., eot, 0, 0, ...]``;
  * ``<start_of_text>`` = 1;
  * ``<end_of_text>`` = ``vocab_size - 1``, the LARGEST id. The text tower pools at the EOT position;
    because EOT is the largest id, both ``tokens.argmax(-1)`` (open_clip's convention) and
    ``(tokens == eot_id)`` find it.

Later stages reuse the same ``DATA_ROOT/tokenizer.json`` so token ids never change as data grows.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_tools.atomic import atomic_write_text
from data_tools.clip_bpe import clean_text, is_clip
from data_tools.manifest import load_manifest, stage_entry

__all__ = ["PAD", "SOT", "EOT", "MIN_CONTEXT_LENGTH", "train_tokenizer", "load_tokenizer", "tokenize", "special_ids"]

logger = logging.getLogger(__name__)

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"
SPECIALS = (PAD, SOT, EOT)
TOKENIZER_NAME = "tokenizer.json"
MIN_CONTEXT_LENGTH = 2  # every row holds sot and eot (run configs are checked against this at load)


def _stage_captions(data_root: Path, stage: int | None) -> Iterator[str]:
    manifest = load_manifest(data_root, missing_ok=False)
    if not manifest["stages"]:
        raise ValueError(f"{data_root}/manifest.json has no stages; ingest data first")
    stage = manifest["stages"][0]["stage"] if stage is None else stage
    entry = stage_entry(manifest, stage)
    if entry is None:
        raise ValueError(f"stage {stage} is not in {data_root}/manifest.json")
    for sh in entry["shards"]:
        with tarfile.open(data_root / sh["name"]) as tf:
            for member in tf:
                if member.name.endswith(".txt"):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield fh.read().decode("utf-8")


def train_tokenizer(data_root: str | Path, *, vocab_size: int = 4096, stage: int | None = None) -> Path:
    """Train byte-level BPE on one stage's captions and save ``DATA_ROOT/tokenizer.json`` atomically.

    Args:
        data_root: the corpus.
        vocab_size: total vocabulary including the three special tokens (>= 260).
        stage: stage whose captions are used (default: the first).

    Returns:
        The tokenizer path.
    """
    if vocab_size < 260:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs >= 260 (256 bytes + specials)")
    root = Path(data_root)
    captions = list(_stage_captions(root, stage))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # EOT is added after training so that it gets the largest id
        special_tokens=[PAD, SOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(captions), trainer=trainer)
    tok.add_special_tokens([EOT])
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    tok.enable_padding(pad_id=tok.token_to_id(PAD), pad_token=PAD)
    path = root / TOKENIZER_NAME
    atomic_write_text(path, tok.to_str())
    logger.info(
        "tokenizer: %d tokens from %d captions -> %s (pad=0 sot=%d eot=%d)",
        tok.get_vocab_size(),
        len(captions),
        path,
        sot,
        eot,
    )
    return path


def load_tokenizer(path_or_root: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (give the file or the DATA_ROOT that holds it)."""
    path = Path(path_or_root)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m data_tools train-tokenizer DATA_ROOT`")
    tok = Tokenizer.from_str(path.read_text())
    tok.no_padding()
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"pad": 0, "sot": 1, "eot": vocab_size - 1}`` (CLIP's BPE: pad 0, sot 49406, eot 49407)."""
    pad = tok.token_to_id(PAD)
    return {"pad": 0 if pad is None else pad, "sot": tok.token_to_id(SOT), "eot": tok.token_to_id(EOT)}


def _strip_specials(text: str) -> str:
    """Remove literal special-token strings from a text (each becomes a space; whitespace is then collapsed).

    Otherwise the tokenizer would encode a caption's ``<end_of_text>`` as the EOT id and move the
    pooling position (the text tower pools at the largest id). Replacing with a space can never form
    a new special string, so one pass is enough.
    """
    if "<" not in text or not any(sp in text for sp in SPECIALS):
        return text
    for sp in SPECIALS:
        text = text.replace(sp, " ")
    return " ".join(text.split())


def tokenize(texts: str | Sequence[str], context_length: int, tokenizer: Tokenizer | str | Path) -> torch.Tensor:
    """Tokenize to a ``LongTensor (B, L)``: ``[sot, ..., eot]`` padded with pad id 0.

    Too-long texts are truncated and still end with EOT at position ``L - 1``. Literal special-token
    strings inside a text (``<pad>``, ``<start_of_text>``, ``<end_of_text>``) are removed first, so
    the only special ids in a row are the ones added here.

    Args:
        texts: one text or a list.
        context_length: L (>= 2).
        tokenizer: a loaded tokenizer, its file, or the DATA_ROOT holding ``tokenizer.json``.
    """
    if context_length < MIN_CONTEXT_LENGTH:
        raise ValueError(f"context_length={context_length} must be >= {MIN_CONTEXT_LENGTH} (room for sot and eot)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    ids = special_ids(tok)
    pad, sot, eot = ids["pad"], ids["sot"], ids["eot"]
    texts = [texts] if isinstance(texts, str) else list(texts)
    if is_clip(tok):  # CLIP's BPE expects CLIP's cleaning (ftfy, HTML entities, whitespace, lower case)
        texts = [clean_text(t) for t in texts]
    rows = []
    for enc in tok.encode_batch([_strip_specials(t) for t in texts], add_special_tokens=False):
        body = enc.ids[: context_length - 2]
        rows.append([sot, *body, eot, *([pad] * (context_length - 2 - len(body)))])
    return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)


def describe(path: str | Path) -> str:
    """One-line JSON description (vocab size and special ids) for logs."""
    tok = load_tokenizer(path)
    return json.dumps({"vocab_size": tok.get_vocab_size(), **special_ids(tok)})
