"""The functional core: run a Layer with substituted tensors, name-keyed gradients."""

from .call import functional_call, substituted
from .grad import SecondOrderUnsupportedError, named_grad
from .params import adaptable_parameters, running_statistics

__all__ = [
    "adaptable_parameters",
    "running_statistics",
    "substituted",
    "functional_call",
    "named_grad",
    "SecondOrderUnsupportedError",
]
