"""The training batch stream: resumable, and the same global batch for any world size.

Two properties the streaming loaders of ``data_tools`` do not have on their own:

* **World-size independence.** The global batch is the concatenation, in order, of ``streams``
  independent sub-streams (``make_train_loader(rank=v, world_size=streams)`` for v = 0..streams-1).
  Rank r of W reads streams ``r·streams/W … (r+1)·streams/W - 1``. With ``train.data_streams``
  fixed, 1 process and 2 processes see exactly the same global batches (the 2-process test).
* **Restorable position.** A streaming loader with a shuffle buffer has no serialisable state, so
  the stream is *re-seeded* from ``(data.seed, stage, step)`` at every segment boundary (every
  ``train.checkpoint_every`` steps, where the periodic checkpoints are taken). The data position is
  ``(segment_start, offset)``: resuming re-creates the segment's loaders and skips ``offset``
  micro-batches (data loading only; zero after a periodic checkpoint, at most one segment after a
  preemption checkpoint). Resumed and uninterrupted runs therefore read identical batches.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_tools.loaders import make_train_loader, stage_weights
from jobs.config import ConfigError, DataCfg

__all__ = ["DataPosition", "BatchStream", "check_corpus", "check_tokenizer", "check_tokenizer_text", "segment_seed"]

logger = logging.getLogger(__name__)


def check_corpus(
    root: Path,
    stages: int,
    vocab_size: int,
    tokenizer: str | None = "corpus",
    *,
    image_size: int | None = None,
    allow_upscale: bool = False,
) -> None:
    """The corpus can feed stages 1..``stages`` of a model with ``vocab_size`` tokens and ``image_size`` px images
    (checked before any job starts: ``plan``, ``submit``, ``train``).

    Raises:
        ConfigError: no manifest (or an unreadable one), a stage missing or empty, shard images smaller than
            ``image_size`` (unless ``allow_upscale``: then a warning), no tokenizer, or a tokenizer larger than the
            model's vocabulary; each message names the file and the fix.
    """
    from data_tools.manifest import MANIFEST_NAME, check_no_empty_stages, load_manifest, stage_entry

    root = Path(root)
    try:
        manifest = load_manifest(root, missing_ok=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    have = [s["stage"] for s in manifest["stages"]]
    missing = [s for s in range(1, stages + 1) if stage_entry(manifest, s) is None]
    if missing:
        raise ConfigError(
            f"the corpus lacks stages {missing} (it has {have}) ({root / MANIFEST_NAME}); ingest them "
            f"(python -m data_tools ingest ...) or lower data.stages / --stage"
        )
    try:
        check_no_empty_stages(manifest, root)  # an empty stage (appended by an older ingest) is refused with its fix
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if image_size is not None:
        _check_image_size(root / MANIFEST_NAME, manifest, stages, image_size, allow_upscale)
    if tokenizer is not None:  # None: the caller checks the run's own tokenizer (jobs/engine/tokens.py)
        check_tokenizer(root, vocab_size, tokenizer)


def _check_image_size(where: Path, manifest: dict[str, Any], stages: int, image_size: int, allow_upscale: bool) -> None:
    """Every stage 1..``stages`` holds images at least ``image_size`` px (``data_tools.manifest.stage_image``)."""
    from data_tools.manifest import stage_entry, stage_image

    small = {}
    for s in range(1, stages + 1):
        size = stage_image(stage_entry(manifest, s) or {})["size"]
        if isinstance(size, int) and size < image_size:
            small[s] = size
    if not small:
        return
    what = ", ".join(f"stage {s}: {px} px" for s, px in small.items())
    if allow_upscale:
        logger.warning(
            "the shard images are smaller than model.image.image_size=%d (%s; %s): the loader upscales them "
            "(data.allow_upscale is on)", image_size, what, where,
        )  # fmt: skip
        return
    largest = min(small.values())
    raise ConfigError(
        f"model.image.image_size={image_size} is larger than the shard images ({what}; {where}): the model would "
        f"train on upscaled images; --set model.image.image_size={largest} (or smaller), or re-ingest the crawl with "
        f"`python -m data_tools ingest ... --image-size {image_size}`, or --set data.allow_upscale=true to train on "
        "upscaled images knowingly"
    )


def check_tokenizer(root: Path, vocab_size: int, setting: str = "corpus") -> None:
    """The tokenizer ``data.tokenizer`` names (``setting``) exists and fits a model with ``vocab_size`` tokens
    (:func:`check_tokenizer_text`).

    Raises:
        ConfigError: no such tokenizer, or one that does not fit.
    """
    from jobs.engine.tokens import source_text

    text, desc = source_text(setting, root)
    fix = (
        f"rebuild it with `python -m data_tools train-tokenizer {root} --vocab-size {vocab_size}`"
        if setting == "corpus"
        else "fix data.tokenizer"
    )
    check_tokenizer_text(text, desc, vocab_size, fix)


def check_tokenizer_text(text: str, desc: str, vocab_size: int, fix: str) -> None:
    """A tokenizer.json (its ``text``, from ``desc``) the model can use: readable, with ``<start_of_text>`` and
    ``<end_of_text>``, end-of-text the largest id (the text tower pools at the argmax), and no more tokens than
    ``vocab_size``.

    Raises:
        ConfigError: what is wrong, ``desc`` and ``fix`` named.
    """
    from tokenizers import Tokenizer

    from data_tools.tokenizer import EOT, SOT

    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # the tokenizers library raises plain Exceptions on a damaged file
        raise ConfigError(f"the tokenizer cannot be read: {type(exc).__name__}: {exc} ({desc}); {fix}") from None
    vocab = tok.get_vocab_size()
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    if sot is None or eot is None:
        missing = [name for name, i in ((SOT, sot), (EOT, eot)) if i is None]
        raise ConfigError(
            f"tokenizer {desc} has no {' and no '.join(missing)} token (the model's start and end of text); "
            f"{fix}: use data.tokenizer corpus, clip or a tokenizer.json with both"
        )
    if eot != vocab - 1:
        raise ConfigError(
            f"tokenizer {desc}: {EOT} is id {eot}, not the largest ({vocab - 1}); the text tower pools at the "
            f"largest id, so it must be: {fix}"
        )
    if vocab > vocab_size:
        raise ConfigError(
            f"tokenizer {desc} has {vocab} tokens but model.text.vocab_size={vocab_size} (token ids must be < "
            f"vocab_size, end-of-text is the highest id): set --set model.text.vocab_size={vocab}, or {fix}"
        )


@dataclass(frozen=True)
class DataPosition:
    """Where the stream is: segment start step and micro-batches consumed per stream since then."""

    segment_start: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"segment_start": self.segment_start, "offset": self.offset}


def segment_seed(seed: int, stage: int, segment_start: int) -> int:
    """Loader seed of one segment: a hash, so neighbouring segments get unrelated streams."""
    digest = hashlib.sha256(f"growclip-data:{seed}:{stage}:{segment_start}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class BatchStream:
    """Per-rank micro-batches ``(images (B,3,H,W), tokens (B,L))`` of a stage's data mixture.

    Args:
        data: the ``data`` config section (root, replay, workers, shuffle buffer, seed, val split).
        stage: growth stage t; stages 1..t are mixed (newest ``1 - replay``).
        per_stream_batch: samples each stream contributes to one micro-batch.
        streams: number of sub-streams making up the global batch (multiple of ``world_size``).
        rank: this process's rank.
        world_size: number of ranks.
        image_size: image side of the model.
        context_length: token length of the model.
        segment_every: steps between re-seeds (the checkpoint interval).
        position: where to start (resume) — default the beginning.
        tokenizer: the run's tokenizer file (default ``DATA_ROOT/tokenizer.json``).
    """

    def __init__(
        self,
        data: DataCfg,
        stage: int,
        *,
        per_stream_batch: int,
        streams: int,
        rank: int,
        world_size: int,
        image_size: int,
        context_length: int,
        segment_every: int,
        position: DataPosition = DataPosition(),
        tokenizer: Path | None = None,
    ) -> None:
        if streams % world_size:
            raise ValueError(f"train.data_streams={streams} must be a multiple of the world size {world_size}")
        self.data, self.stage = data, stage
        self.per_stream_batch, self.streams = per_stream_batch, streams
        self.image_size, self.context_length = image_size, context_length
        self.segment_every, self.tokenizer = segment_every, tokenizer
        per_rank = streams // world_size
        self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.stages = list(range(1, stage + 1))
        self.mix = stage_weights(self.stages, data.replay_fraction)
        self._iters: list[Iterator[Any]] = []
        self._stage_counts: Counter[int] = Counter()  # samples per stage since the last take_mix()
        self.position = position
        self._open(position)

    def _open(self, position: DataPosition) -> None:
        self._iters = []  # drop the old loaders first: their worker processes exit with them
        seed = segment_seed(self.data.seed, self.stage, position.segment_start)
        for v in self.my_streams:
            loader = make_train_loader(
                self.data.root,
                self.stages,
                batch_size=self.per_stream_batch,
                image_size=self.image_size,
                context_length=self.context_length,
                replay=self.data.replay_fraction,
                seed=seed,
                rank=v,
                world_size=self.streams,
                num_workers=self.data.num_workers,
                shuffle_buffer=self.data.shuffle_buffer,
                augment=True,
                val_fraction=self.data.val_fraction,
                tokenizer=self.tokenizer,
            )
            self._iters.append(iter(loader))
        if position.offset:
            logger.info(
                "data: fast-forwarding %d micro-batches into the segment that started at step %d",
                position.offset,
                position.segment_start,
            )
            for _ in range(position.offset):
                for it in self._iters:
                    next(it)
        self.position = position

    def begin_step(self, step: int) -> None:
        """Call before each optimizer step: re-seeds the stream at segment boundaries."""
        if step % self.segment_every == 0 and step != self.position.segment_start:
            self._open(DataPosition(segment_start=step, offset=0))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch (its streams concatenated in order)."""
        parts = [next(it) for it in self._iters]
        self.position = DataPosition(self.position.segment_start, self.position.offset + 1)
        for p in parts:  # data_tools' TrainBatch says which stage each sample came from
            self._stage_counts.update(getattr(p, "stats", {}).get("stages", {}))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def take_mix(self) -> dict[str, float]:
        """Observed share of samples per stage since the previous call (target weights if unknown)."""
        counts, self._stage_counts = self._stage_counts, Counter()
        n = sum(counts.values())
        if not n:
            return {str(s): round(w, 4) for s, w in self.mix.items()}
        return {str(s): round(counts[s] / n, 4) for s in self.stages}

    def close(self) -> None:
        """Release the loaders (and their worker processes)."""
        self._iters = []
