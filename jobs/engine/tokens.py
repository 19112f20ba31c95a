"""The tokenizer belongs to the run (issue #18): one file per training, its hash in every checkpoint.

``data.tokenizer`` names where a run's tokenizer comes from: ``corpus`` (``DATA_ROOT/tokenizer.json``, the
byte-level BPE trained on stage 1's captions), ``clip`` (CLIP's standard BPE from the open_clip wheel,
data_tools/clip_bpe.py) or the path of a ``tokenizer.json``. A training copies it into its run dir as
``tokenizer.json`` once its start checks pass (:func:`keep_run_tokenizer`) and from then on uses that copy,
whatever happens to the source (:func:`run_tokenizer_text`); its SHA-256 goes into every checkpoint
(``tokenizer_sha256``). Whatever reads a checkpoint later — a resumed training,
the next stage's training of a grown model, ``evaluate``, ``export`` — takes the tokenizer with that hash
(:func:`checkpoint_tokenizer`) and refuses any other, naming both.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.tokenizer import TOKENIZER_NAME
from jobs.config import ConfigError
from jobs.engine.rundir import RunDir

__all__ = [
    "TOKENIZER_NAME",
    "checkpoint_tokenizer",
    "check_same_tokenizer",
    "keep_run_tokenizer",
    "run_tokenizer_text",
    "source_text",
    "text_sha256",
]

logger = logging.getLogger(__name__)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _describe(setting: str, data_root: Path) -> str:
    if setting == "corpus":
        return f"data.tokenizer=corpus ({Path(data_root) / TOKENIZER_NAME})"
    if setting == "clip":
        return "data.tokenizer=clip (CLIP's BPE from open-clip-torch)"
    return f"data.tokenizer={setting}"


def source_text(setting: str, data_root: Path) -> tuple[str, str]:
    """The tokenizer ``data.tokenizer`` names, as ``(tokenizer.json text, a description for messages)``.

    Raises:
        ConfigError: the file is missing or unreadable, or open-clip-torch is missing for ``clip``.
    """
    desc = _describe(setting, data_root)
    if setting == "clip":
        from data_tools.clip_bpe import build_clip_tokenizer

        try:
            return build_clip_tokenizer().to_str(), desc
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    path = Path(data_root) / TOKENIZER_NAME if setting == "corpus" else Path(setting)
    if not path.is_file():
        fix = "fix data.tokenizer"
        if setting == "corpus":
            fix = (
                f"build the corpus (python -m data_tools build-offline {data_root}) or train one on it "
                f"(python -m data_tools train-tokenizer {data_root})"
            )
        raise ConfigError(f"{path} does not exist ({desc}): {fix}")
    return path.read_text(), desc


def _tokenizers_above(path: Path) -> list[Path]:
    """Every ``tokenizer.json`` in the run dirs holding ``path`` (its folder and up), nearest first."""
    return [RunDir(d).tokenizer_json for d in Path(path).resolve().parents if RunDir(d).tokenizer_json.is_file()]


def run_tokenizer_text(run_dir: Path, setting: str, data_root: Path, hashes: Sequence[str] = ()) -> tuple[str, str]:
    """The tokenizer a training in ``run_dir`` uses, as ``(tokenizer.json text, where it comes from)``:

    1. the run's own copy ``RUN_DIR/tokenizer.json`` when it exists — the authority from its first training
       on (a source that changed since is only warned about: the run goes on with its own);
    2. else the nearest ``tokenizer.json`` above ``run_dir`` whose hash is one of ``hashes`` (the checkpoints the
       training starts from: a search candidate's or the oracle's work dir inherits its run's tokenizer);
    3. else ``data.tokenizer`` (``setting``).

    Nothing is written here: :func:`keep_run_tokenizer` copies it once every start check has passed.
    """
    own = RunDir(run_dir).tokenizer_json
    if own.is_file():
        text = own.read_text()
        try:
            src, desc = source_text(setting, data_root)
        except ConfigError:
            src, desc = text, ""
        if text_sha256(src) != text_sha256(text):
            logger.warning(
                "%s differs from the run's own tokenizer %s: the run goes on with its own (sha256 %s)",
                desc, own, text_sha256(text)[:12],
            )  # fmt: skip
        return text, str(own)
    for up in _tokenizers_above(own):
        if text_sha256(up.read_text()) in hashes:
            return up.read_text(), str(up)
    return source_text(setting, data_root)


def keep_run_tokenizer(run_dir: Path, text: str, where: str) -> Path:
    """Copy the training's tokenizer into ``RUN_DIR/tokenizer.json`` unless it is there (atomically; every rank
    may write it: the same bytes)."""
    from data_tools.atomic import atomic_write_text

    own = RunDir(run_dir).tokenizer_json
    if not own.is_file():
        own.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(own, text)
        logger.info("tokenizer: %s copied to %s (sha256 %s)", where, own, text_sha256(text)[:12])
    return own


def check_same_tokenizer(payload: dict[str, Any], what: Path, tokenizer: Path | str, text: str | None = None) -> None:
    """The checkpoint ``what`` (its ``payload``) was trained with ``tokenizer`` (a file, or where ``text`` came
    from).

    A checkpoint written before tokenizers were recorded has no hash: accepted with a warning.

    Raises:
        ConfigError: the hashes differ; the message names both.
    """
    want = payload.get("tokenizer_sha256")
    have = text_sha256(Path(tokenizer).read_text() if text is None else text)
    if want is None:
        logger.warning("%s records no tokenizer (written before runs kept theirs): assuming %s", what, tokenizer)
    elif want != have:
        raise ConfigError(
            f"{what} was trained with a tokenizer of sha256 {want[:12]}, but {tokenizer} has sha256 {have[:12]}: "
            "give the run's own tokenizer (the tokenizer.json of the run dir that wrote the checkpoint, --tokenizer)"
        )


def checkpoint_tokenizer(ckpt: Path, payload: dict[str, Any], explicit: Path | None, data_root: Path | None) -> Path:
    """The tokenizer to read checkpoint ``ckpt`` with: ``explicit`` if given (a file, or a folder holding
    ``tokenizer.json``), else the nearest ``tokenizer.json``
    in the checkpoint's folder or above (its run dir), else ``data_root``'s; checked against the checkpoint's hash.

    Raises:
        ConfigError: none found, or the one found is not the checkpoint's (both named).
    """
    if explicit is not None:
        candidates = [Path(explicit) / TOKENIZER_NAME if Path(explicit).is_dir() else Path(explicit)]
    else:
        candidates = _tokenizers_above(ckpt)[:1]
        if not candidates and data_root is not None:
            candidates = [Path(data_root) / TOKENIZER_NAME]
    if not candidates or not candidates[0].is_file():
        raise ConfigError(
            f"no tokenizer for {ckpt}: none in its run dir, "
            + (f"none at {candidates[0]}" if candidates else "no --data-root")
            + "; pass --tokenizer FILE (the tokenizer.json the run trained with)"
        )
    check_same_tokenizer(payload, ckpt, candidates[0])
    return candidates[0]
