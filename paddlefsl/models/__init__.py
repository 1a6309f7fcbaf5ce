"""Standard few-shot backbones (plain ``paddle.nn`` layers)."""

from .conv4 import Conv4
from .mlp import MLP

__all__ = ["Conv4", "MLP"]
