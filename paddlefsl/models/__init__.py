"""Standard few-shot backbones, and the layers they use (fused BatchNorm + ReLU, SAME padding)."""

from .conv4 import Conv4
from .layers import BatchNormReLU2D, SamePadConv2D, same_padding
from .mlp import MLP

__all__ = ["MLP", "BatchNormReLU2D", "Conv4", "SamePadConv2D", "same_padding"]
