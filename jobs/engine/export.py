"""Export a checkpoint as a folder open_clip loads: ``python -m jobs export --format open_clip`` (issue #18).

The folder (written atomically: a temp folder beside ``--out``, renamed into place)::

    DIR/open_clip_config.json        model_cfg (model/export_open_clip.py) + preprocess_cfg (ours: size,
                                     CLIP mean/std, bicubic, shortest-side resize + centre crop)
    DIR/open_clip_model.safetensors  the weights (EMA or raw), mapped to open_clip's CLIP
    DIR/tokenizer.json, tokenizer_config.json   the run's tokenizer as a Hugging Face tokenizer
                                     (data_tools/hf_tokenizer.py): the same ids as ours
    DIR/growclip_export.json         where it came from: checkpoint, step, weights, spec, tokenizer hash
    DIR/README.md                    how to load it

and ``open_clip.create_model_and_transforms("local-dir:DIR")`` / ``open_clip.get_tokenizer("local-dir:DIR")``
give our embeddings, logit scale and token ids (tests/test_export.py). open_clip's ``HFTokenizer`` cleans
every text first (ftfy, HTML entities, whitespace; for CLIP's BPE also lower case, exactly as we do): for
the corpus tokenizer ids differ from ours on a text that this cleaning changes (training captions are
whitespace-normalised at ingest, not ftfy-fixed).
"""

from __future__ import annotations

import json
import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_tools.atomic import atomic_dir
from jobs.engine.checkpoint import load_checkpoint
from model.export_open_clip import ExportError, check_exportable, open_clip_model_cfg, to_open_clip_state_dict
from model.spec import ArchSpec

__all__ = ["ExportError", "ExportSummary", "export_open_clip", "select_weights"]

logger = logging.getLogger(__name__)

FORMAT = "growclip-open-clip-export"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name open_clip looks for in a local dir
PROVENANCE = "growclip_export.json"  # marks a folder as an export (--force replaces only such a folder)
OPEN_CLIP_TESTED = "3.3.0"  # the open-clip-torch version tests/test_export.py round-trips through
# text_cfg.hf_tokenizer_name only has to be non-empty for open_clip to use the folder's tokenizer.json
# (local-dir: always the folder itself); on a model hub it must be the repo id (README.md says so)
HF_TOKENIZER_NAME = "growclip-tokenizer"

Weights = Literal["ema", "raw"]


@dataclass(frozen=True)
class ExportSummary:
    """What was exported (logged, and the result of :func:`export_open_clip`)."""

    out: Path
    weights: Weights
    params: int  # of the exported open_clip model
    image_size: int
    context_length: int
    tokenizer: Path
    logit_scale_clamped: bool  # ours was above log(100), where our forward clamps it


def select_weights(payload: dict[str, Any], checkpoint: Path, weights: Weights | None) -> tuple[dict, Weights]:
    """The state dict to export: ``weights`` (default: the EMA when the checkpoint has one, else the raw weights).

    Raises:
        ExportError: ``weights="ema"`` for a checkpoint without EMA.
    """
    ema = payload.get("ema")
    if weights is None:
        weights = "ema" if ema is not None else "raw"
    if weights == "ema" and ema is None:
        raise ExportError(
            f"{checkpoint} has no EMA weights (trained with train.ema_decay=0): export the raw weights, --weights raw"
        )
    return (ema if weights == "ema" else payload["model"]), weights


def _check_out(out: Path, force: bool, checkpoint: Path) -> None:
    """``out`` is new, empty, or (``force``) an earlier export: ``--force`` never deletes anything else."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder (created if missing)")
    if out.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"--out {out} holds the checkpoint {checkpoint}: give a folder outside it")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} exists and is not empty: give a new folder, or --force to replace it")
        if not (out / PROVENANCE).is_file():
            raise ExportError(
                f"--out {out} is not an earlier export (no {PROVENANCE}): --force only replaces an export; give a "
                "new or empty folder"
            )


def _tokenizer_file(checkpoint: Path, payload: dict[str, Any], explicit: Path | None) -> Path:
    """The run's tokenizer (jobs/engine/tokens.py: explicit, the run dir's, or the corpus's), hash-checked."""
    from jobs.engine.tokens import checkpoint_tokenizer

    root = payload.get("config", {}).get("data", {}).get("root")
    return checkpoint_tokenizer(checkpoint, payload, explicit, Path(root) if root else None)


def _preprocess_cfg(image_size: int) -> dict[str, Any]:
    """open_clip's preprocess_cfg for what our eval/val images get (data_tools/loaders.py)."""
    from data_tools.loaders import MEAN, STD

    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",  # data_tools.imaging.resize_image
        "resize_mode": "shortest",  # cover the square, centre crop: resize_image(..., "center_crop")
        "fill_color": 0,
    }


def _readme(summary: ExportSummary) -> str:
    return (
        "# GrowCLIP model exported for open_clip\n\n"
        "```python\nimport open_clip\n"
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH")\n'
        'tokenizer = open_clip.get_tokenizer("local-dir:PATH")  # needs transformers\n```\n\n'
        f"Weights: {summary.weights}; {summary.params:,} parameters; images {summary.image_size} px; "
        f"context {summary.context_length} tokens. Provenance: growclip_export.json. On a model hub, set "
        "model_cfg.text_cfg.hf_tokenizer_name in open_clip_config.json to the repo id.\n"
    )


def export_open_clip(
    checkpoint: Path, out: Path, *, weights: Weights | None = None, tokenizer: Path | None = None, force: bool = False
) -> ExportSummary:
    """Write ``checkpoint`` as an open_clip ``local-dir`` folder at ``out`` (see the module docstring).

    Args:
        checkpoint: a verified ``step_*.pt``, ``final.pt`` or ``selected.pt``.
        out: the folder to create (must not exist or be empty, unless ``force``).
        weights: ``"ema"`` or ``"raw"``; default the EMA when the checkpoint has one.
        tokenizer: the tokenizer.json (or a folder holding one); default the run's (hash-checked).
        force: replace a non-empty ``out``.

    Raises:
        CheckpointError: the checkpoint is unusable.
        ExportError: the model cannot be expressed in open_clip (shared encoder), no EMA, ``out`` in the way, a
            tokenizer larger than the model's vocabulary.
        ConfigError: no tokenizer, or not the checkpoint's.
    """
    from safetensors.torch import save_file

    from data_tools.clip_bpe import is_clip
    from data_tools.hf_tokenizer import save_hf_tokenizer
    from data_tools.tokenizer import load_tokenizer
    from jobs.engine.tokens import text_sha256

    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out, force, Path(checkpoint))
    payload = load_checkpoint(checkpoint)
    spec = ArchSpec.from_dict(payload["spec"])
    check_exportable(spec)
    state, kind = select_weights(payload, checkpoint, weights)
    tok_path = _tokenizer_file(checkpoint, payload, tokenizer)
    tok = load_tokenizer(tok_path)
    if tok.get_vocab_size() > spec.text.vocab_size:
        raise ExportError(
            f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens but the model's vocab_size is "
            f"{spec.text.vocab_size}: not this model's tokenizer; give the run's own with --tokenizer"
        )
    sd = to_open_clip_state_dict(state, spec)
    model_cfg = open_clip_model_cfg(spec)
    model_cfg["text_cfg"]["hf_tokenizer_name"] = HF_TOKENIZER_NAME
    # open_clip cleans each text before the tokenizer; "lower" is CLIP's cleaning, the one we apply for its BPE
    model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "lower" if is_clip(tok) else "whitespace"}
    config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(spec.image.image_size)}
    summary = ExportSummary(
        out=out,
        weights=kind,
        params=sum(t.numel() for t in sd.values()),
        image_size=spec.image.image_size,
        context_length=spec.text.context_length,
        tokenizer=tok_path,
        logit_scale_clamped=bool(state["logit_scale"].item() > sd["logit_scale"].item()),
    )
    provenance = {
        "format": FORMAT,
        "version": 1,
        "checkpoint": str(checkpoint.resolve()),
        "step": payload.get("step"),
        "stage": payload.get("stage"),
        "samples_seen": payload.get("samples_seen"),
        "weights": kind,
        "spec": spec.to_dict(),
        "tokenizer": str(tok_path),
        "tokenizer_sha256": text_sha256(tok_path.read_text()),
        "logit_scale_clamped": summary.logit_scale_clamped,
        "open_clip_tested": OPEN_CLIP_TESTED,
    }
    try:
        with atomic_dir(out, replace=force) as tmp:
            (tmp / "README.md").write_text(_readme(summary), encoding="utf-8")
            save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / WEIGHTS_FILE).chmod(stat.S_IMODE((tmp / "README.md").stat().st_mode))  # safetensors: 0600
            (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_hf_tokenizer(tok, tmp, spec.text.context_length)
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    except FileExistsError as exc:  # appeared since _check_out
        raise ExportError(f"--out: {exc}; give a new folder, or --force to replace it") from None
    logger.info(
        "export: %s (step %s) weights=%s%s -> %s: open_clip, %.2fM params, image %d px, context %d, tokenizer %s%s",
        checkpoint,
        payload.get("step"),
        kind,
        "" if weights else f" (the default: the checkpoint has {'an' if kind == 'ema' else 'no'} EMA)",
        out,
        summary.params / 1e6,
        summary.image_size,
        summary.context_length,
        tok_path,
        "; logit scale clamped to log(100) as our forward does" if summary.logit_scale_clamped else "",
    )
    return summary
