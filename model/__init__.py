"""GrowCLIP model package: ArchSpec, the CLIP module with a shared encoder, growth operators and PIM."""

from model import tv_guard  # noqa: F401  -- must run before anything imports timm or torchvision
from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec
from model.structs import ConfigError

__all__ = ["ArchSpec", "ImageSpec", "SharedSpec", "TextSpec", "ConfigError"]
