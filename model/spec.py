"""ArchSpec: the architecture of a GrowCLIP model as a frozen value.

GrowCLIP (growth space, §3 of the paper; our reading in shared/DESIGN.md) moves between architectures
A_0 -> A_1 -> ...; each A_t is one :class:`ArchSpec`. Growth produces a new spec with
``dataclasses.replace`` and never mutates the old one. The dict shape is fixed (issue #3)::

    {"image":  {"image_size", "patch_size", "width", "depth", "heads", "mlp_ratio"},
     "text":   {"vocab_size", "context_length", "width", "depth", "heads", "mlp_ratio"},
     "shared": {"width", "depth", "heads", "mlp_ratio"},
     "embed_dim"}

``shared.depth == 0`` means no shared cross-modal encoder (plain CLIP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model.axes import SPEC_FIELD, TOWERS, Tower
from model.structs import ConfigError, closest, from_dict, to_dict

__all__ = [
    "TINY",
    "VIT_B16",
    "ImageSpec",
    "TextSpec",
    "SharedSpec",
    "ArchSpec",
    "Tower",
    "TOWERS",
    "SPEC_FIELD",
    "block_params",
    "block_macs",
]

# The towers as named in state-dict keys and in growth arguments (``insert_at``, ``tower=``), and their
# ArchSpec sections (``visual`` -> ``image``): one table, model/axes.py.


def block_params(width: int, mlp_width: int) -> int:
    """Parameters of one timm ``Block`` with qkv bias: 2 norms, qkv, proj, fc1, fc2 (weights + biases)."""
    d, m = width, mlp_width
    return 4 * d * d + 2 * d * m + 9 * d + m


def block_macs(width: int, mlp_width: int, tokens: int) -> int:
    """Multiply-accumulates of one block's forward on ``tokens`` tokens.

    qkv (3·D²), proj (D²), fc1 + fc2 (2·D·M) per token, plus attention scores Q·Kᵀ and the weighted
    sum of values (L²·D each). Causal attention is counted in full (what SDPA's kernels compute
    for short sequences); norms, softmax and GELU are ignored (elementwise, not matmul).
    """
    d, m, n = width, mlp_width, tokens
    return n * (4 * d * d + 2 * d * m) + 2 * n * n * d


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_types(owner: str, obj: Any) -> None:
    """Field types of a directly constructed spec (``from_dict`` converts before it gets here)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.type == "int":
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif f.type == "float":
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        if not ok:
            raise TypeError(f"{owner}.{f.name}={value!r} ({type(value).__name__}): expected {expected}")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name}={value} must be > 0")


def _check_blocks(owner: str, width: int, heads: int, mlp_ratio: float) -> None:
    """Validation shared by every transformer tower: heads | width and an integral MLP width."""
    _check_positive(owner, width=width, heads=heads, mlp_ratio=mlp_ratio)
    if width % heads:
        raise ValueError(f"{owner}.heads={heads} must divide {owner}.width={width}; pick heads in {_divisors(width)}")
    # timm's Block sizes its MLP as int(width * mlp_ratio) in floating point, so the product must be
    # exactly integral there (0.57 * 100 = 56.99999999999999 would build 56 units, not 57).
    hidden = width * mlp_ratio
    if hidden != int(hidden):
        raise ValueError(
            f"{owner}.width * {owner}.mlp_ratio = {width} * {mlp_ratio} = {hidden!r} must be a whole number in "
            f"floating point (the MLP hidden width); pick mlp_ratio = hidden / width with a hidden width that "
            f"makes it exact, e.g. a power-of-two fraction such as 4.0, 2.5 or 5.25"
        )


@dataclass(frozen=True)
class ImageSpec:
    """ViT image tower."""

    image_size: int = 224  # input resolution (square); must be a multiple of patch_size
    patch_size: int = 16  # side of the square patches fed to the patch embedding
    width: int = 768  # token width D of the image tower
    depth: int = 12  # number of transformer blocks (resblocks)
    heads: int = 12  # attention heads; head_dim = width // heads
    mlp_ratio: float = 4.0  # MLP hidden width = width * mlp_ratio

    def __post_init__(self) -> None:
        _check_types("image", self)
        _check_positive("image", image_size=self.image_size, patch_size=self.patch_size, depth=self.depth)
        _check_blocks("image", self.width, self.heads, self.mlp_ratio)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image.image_size={self.image_size} must be a multiple of image.patch_size={self.patch_size}"
            )

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextSpec:
    """Causal text transformer with end-of-text pooling."""

    vocab_size: int = 49408  # tokenizer vocabulary size (token ids must be < vocab_size)
    context_length: int = 77  # maximum tokens per caption, including start/end tokens
    width: int = 512  # token width D of the text tower
    depth: int = 12  # number of transformer blocks
    heads: int = 8  # attention heads; head_dim = width // heads
    mlp_ratio: float = 4.0  # MLP hidden width = width * mlp_ratio

    def __post_init__(self) -> None:
        _check_types("text", self)
        _check_positive("text", vocab_size=self.vocab_size, context_length=self.context_length, depth=self.depth)
        _check_blocks("text", self.width, self.heads, self.mlp_ratio)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class SharedSpec:
    """Shared cross-modal encoder: the same blocks run on image tokens and on text tokens."""

    width: int = 512  # shared token width; each modality is projected to it
    depth: int = 0  # number of shared blocks; 0 = no shared encoder (plain CLIP)
    heads: int = 8  # attention heads of the shared blocks
    mlp_ratio: float = 4.0  # MLP hidden width = width * mlp_ratio

    def __post_init__(self) -> None:
        _check_types("shared", self)
        if self.depth < 0:
            raise ValueError(f"shared.depth={self.depth} must be >= 0 (0 = no shared encoder)")
        _check_blocks("shared", self.width, self.heads, self.mlp_ratio)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ArchSpec:
    """Whole-model architecture: two towers, an optional shared encoder and the joint embedding."""

    image: ImageSpec = field(default_factory=ImageSpec)  # image tower
    text: TextSpec = field(default_factory=TextSpec)  # text tower
    shared: SharedSpec = field(default_factory=SharedSpec)  # shared cross-modal encoder
    embed_dim: int = 512  # width of the joint (contrastive) embedding space

    def __post_init__(self) -> None:
        # ArchSpec(image={...}) would otherwise fail much later with a bare AttributeError
        for name, cls in (("image", ImageSpec), ("text", TextSpec), ("shared", SharedSpec)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(
                    f"ArchSpec.{name}: expected {cls.__name__}, got {type(value).__name__}; build a spec from plain "
                    f"dicts with ArchSpec.from_dict(d) or change one with spec.with_changes({name}={{...}})"
                )
        _check_types("arch", self)
        _check_positive("arch", embed_dim=self.embed_dim)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        """Build from the issue-#3 dict shape; unknown keys and invalid values raise ConfigError."""
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict (JSON/YAML-ready) that :meth:`from_dict` reads back."""
        return to_dict(self)

    def with_changes(self, **changes: Any) -> ArchSpec:
        """A validated copy with some fields changed, e.g. ``spec.with_changes(image={"depth": 4})``.

        A mapping updates the fields of that section; a section value (e.g. an :class:`ImageSpec`)
        replaces the whole section; anything else replaces the top-level field.

        Raises:
            ConfigError: unknown field (a state-dict tower name such as ``visual`` is pointed to its
                section ``image``) or an invalid result (same checks as :meth:`from_dict`).
        """
        d = self.to_dict()
        for key, value in changes.items():
            if key not in d:
                if key in SPEC_FIELD:  # a tower name: "visual" is the section "image"
                    did = f" Did you mean {SPEC_FIELD[key]!r} (the ArchSpec section of the {key!r} tower)?"
                else:
                    hint = closest(key, list(d))
                    did = f" Did you mean {hint!r}?" if hint else ""
                raise ConfigError(f"with_changes: unknown field {key!r}.{did} Valid fields: {', '.join(d)}")
            if isinstance(value, (ImageSpec, TextSpec, SharedSpec)):
                value = to_dict(value)
            if isinstance(value, dict) and isinstance(d.get(key), dict):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return ArchSpec.from_dict(d)

    def params(self) -> int:
        """Exact parameter count of ``build_model(self)`` (a test checks it against the module).

        Image: patch embedding (D·3·p² + D), class token (D), positions ((N+1)·D), blocks, final
        norm (2D), projection (E·D, no bias). Text: token embedding (V·D), positions (L·D), blocks,
        final norm, projection. Shared (only when depth > 0): blocks at width S plus in/out projections
        with biases for each modality (2·S·D + S + D per tower). Plus the scalar logit scale.
        """
        im, tx, sh, e = self.image, self.text, self.shared, self.embed_dim
        visual = (
            im.width * 3 * im.patch_size**2
            + im.width
            + im.width
            + (im.num_patches + 1) * im.width
            + im.depth * block_params(im.width, im.mlp_width)
            + 2 * im.width
            + e * im.width
        )
        text = (
            tx.vocab_size * tx.width
            + tx.context_length * tx.width
            + tx.depth * block_params(tx.width, tx.mlp_width)
            + 2 * tx.width
            + e * tx.width
        )
        shared = 0
        if sh.depth > 0:
            shared = sh.depth * block_params(sh.width, sh.mlp_width)
            shared += sum(2 * sh.width * d + sh.width + d for d in (im.width, tx.width))
        return visual + text + shared + 1

    def flops_per_sample(self) -> int:
        """Training FLOPs for one (image, caption) pair: forward + backward, matmuls only.

        Formula (documented estimate, not a measurement)::

            FLOPs = 3 (forward + backward ≈ 1 + 2) × 2 (FLOPs per multiply-accumulate) × MACs_forward

        where MACs_forward sums, for the image (1 + N tokens) and for the text (context_length tokens,
        padding included): patch embedding (N·3p²·D), every block (:func:`block_macs`: qkv, proj,
        MLP and both attention matmuls), the shared encoder's in/out projections and blocks when
        depth > 0 (run once per modality), and the pooled projections to ``embed_dim`` (E·D). The
        B×B similarity matrix of the loss is a per-batch cost and is excluded. Embedding lookups,
        norms, softmax and activations are ignored.
        """
        im, tx, sh, e = self.image, self.text, self.shared, self.embed_dim
        n_img, n_txt = im.num_patches + 1, tx.context_length
        macs = im.num_patches * 3 * im.patch_size**2 * im.width
        macs += im.depth * block_macs(im.width, im.mlp_width, n_img) + e * im.width
        macs += tx.depth * block_macs(tx.width, tx.mlp_width, n_txt) + e * tx.width
        if sh.depth > 0:
            for n, d in ((n_img, im.width), (n_txt, tx.width)):
                macs += 2 * n * d * sh.width + sh.depth * block_macs(sh.width, sh.mlp_width, n)
        return 3 * 2 * macs


# Registered sizes (like timm's registered builders): a CI-sized spec for tests and the ViT-B/16 CLIP.
TINY = ArchSpec(
    image=ImageSpec(image_size=16, patch_size=8, width=32, depth=2, heads=2),
    text=TextSpec(vocab_size=64, context_length=8, width=32, depth=2, heads=2),
    shared=SharedSpec(width=32, depth=0, heads=2),
    embed_dim=16,
)
VIT_B16 = ArchSpec(
    image=ImageSpec(image_size=224, patch_size=16, width=768, depth=12, heads=12),
    text=TextSpec(vocab_size=49408, context_length=77, width=512, depth=12, heads=8),
    shared=SharedSpec(width=512, depth=0, heads=8),
    embed_dim=512,
)
