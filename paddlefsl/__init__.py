"""paddlefsl: gradient-based meta-learning for any ``paddle.nn.Layer``.

The learners live in :mod:`paddlefsl.metaopt`; the functional core in
:mod:`paddlefsl.functional`; double-differentiable op replacements in :mod:`paddlefsl.ops`.
"""

__version__ = "2.0.0.dev0"

from . import functional, metaopt, ops  # noqa: E402
from .metaopt import ANIL, MAML, BaseLearner, check_second_order  # noqa: E402

__all__ = ["MAML", "ANIL", "BaseLearner", "check_second_order", "functional", "metaopt", "ops"]
