"""Meta-learners: MAML, FOMAML (``MAML(first_order=True)``), ANIL, Meta-SGD."""

from ..functional import SecondOrderUnsupportedError
from .anil import ANIL
from .base import BaseLearner
from .gradcheck import SecondOrderReport, check_second_order
from .maml import MAML, sgd_update
from .metasgd import MetaSGD

__all__ = [
    "BaseLearner",
    "MAML",
    "ANIL",
    "MetaSGD",
    "sgd_update",
    "check_second_order",
    "SecondOrderReport",
    "SecondOrderUnsupportedError",
]
