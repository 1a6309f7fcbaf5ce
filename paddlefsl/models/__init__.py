"""Standard few-shot backbones, and a fused BatchNorm + ReLU layer they use."""

from .conv4 import Conv4
from .layers import BatchNormReLU2D
from .mlp import MLP

__all__ = ["BatchNormReLU2D", "Conv4", "MLP"]
