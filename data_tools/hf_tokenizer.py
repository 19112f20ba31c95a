"""Our tokenizer as a Hugging Face tokenizer folder that gives the ids of ``data_tools.tokenizer.tokenize``.

Issue #18 (a model leaves the project with its tokenizer): ``save_hf_tokenizer`` writes ``tokenizer.json``
and ``tokenizer_config.json`` so that ``transformers.AutoTokenizer.from_pretrained(DIR)`` called as
``tok(texts, max_length=L, padding="max_length", truncation=True)`` (what open_clip's ``HFTokenizer`` does)
returns exactly ``tokenize(texts, L, ours)``: ``[sot, body[:L-2], eot, pad, ...]``. How each step of
``tokenize`` is reproduced:

* start/end tokens and truncation: a ``TemplateProcessing`` post-processor adds sot and eot, so the
  library truncates the body to ``L - 2`` and eot stays last;
* padding: ``pad_token`` is the token of our pad id (``<pad>`` = 0; for CLIP's BPE, which has no pad token,
  id 0 is ``!`` as in open_clip);
* literal special strings in a text (``_strip_specials``: removed, and whitespace then collapsed, only in a
  text that holds one): ``split_special_tokens`` keeps the library from matching them as special tokens,
  and a normalizer of three regex replacements (:func:`strip_specials_normalizer`) does what
  ``_strip_specials`` does.

Not reproduced: the cleaning ``tokenize`` applies to a CLIP tokenizer (ftfy, HTML entities, lower case)
cannot be a ``tokenizers`` normalizer; open_clip applies the same cleaning itself (``clean: lower``, set by
the export), a direct ``AutoTokenizer`` user must do it first.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, processors

from data_tools.tokenizer import PAD, SPECIALS, special_ids

__all__ = ["hf_tokenizer", "save_hf_tokenizer", "strip_specials_normalizer"]


@functools.cache
def _python_whitespace() -> str:
    """An Oniguruma class of the characters ``str.split()`` splits on (``str.isspace``; wider than ``\\s``)."""
    chars = [c for c in range(0x110000) if chr(c).isspace()]
    return "[" + "".join(f"\\x{{{c:x}}}" for c in chars) + "]"


def strip_specials_normalizer() -> normalizers.Normalizer:
    """``data_tools.tokenizer._strip_specials`` as a normalizer: in a text that holds a special string, every
    run of whitespace and special strings becomes one space and the ends are stripped; other texts are kept.

    Three passes, because each pass must still see whether the text held a special (``held``: one later, via
    lookahead, or one earlier, via lookbehind, which Oniguruma allows at any length):

    1. a trailing run becomes ``<pad>`` (the text still holds a special, and ends in exactly one);
    2. every other run becomes one space (a leading space is harmless: byte-level BPE adds one anyway);
    3. the trailing ``<pad>`` of step 1 is dropped (a text without specials cannot end in one).
    """
    space = _python_whitespace()
    special = "(?:" + "|".join(re.escape(s) for s in SPECIALS) + ")"
    held = rf"(?:(?=[\s\S]*{special})|(?<={special}[\s\S]*))"
    run = f"(?:{space}|{special})+"
    return normalizers.Sequence(
        [
            normalizers.Replace(Regex(rf"{held}{run}\z"), PAD),
            normalizers.Replace(Regex(rf"{held}(?>{run})(?=[\s\S])"), " "),
            normalizers.Replace(Regex(rf"{re.escape(PAD)}\z"), ""),
        ]
    )


def hf_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` set up for the Hugging Face call (see the module docstring); ``tok`` is unchanged."""
    out = Tokenizer.from_str(tok.to_str())
    ids = special_ids(out)
    strip = strip_specials_normalizer()
    out.normalizer = strip if out.normalizer is None else normalizers.Sequence([strip, out.normalizer])
    sot, eot = out.id_to_token(ids["sot"]), out.id_to_token(ids["eot"])
    out.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, ids["sot"]), (eot, ids["eot"])]
    )
    out.no_padding()  # the caller's padding/truncation arguments decide
    out.no_truncation()
    return out


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path, context_length: int) -> dict[str, Any]:
    """Write ``out_dir/tokenizer.json`` and ``out_dir/tokenizer_config.json`` for ``tok``; return the config.

    The files are written in place: ``out_dir`` is expected to be a temporary folder that the caller
    renames into place (``data_tools.atomic.atomic_dir``).
    """
    ids = special_ids(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.id_to_token(ids["sot"]),
        "eos_token": tok.id_to_token(ids["eot"]),
        "pad_token": tok.id_to_token(ids["pad"]),
        "model_max_length": context_length,
        "padding_side": "right",
        "truncation_side": "right",
        "split_special_tokens": True,  # a literal "<end_of_text>" in a text is text (removed), not the eot id
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer.json").write_text(hf_tokenizer(tok).to_str(), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config
