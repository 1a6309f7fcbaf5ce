"""paddlefsl: gradient-based meta-learning for any ``paddle.nn.Layer``.

The learners live in :mod:`paddlefsl.metaopt`; the functional core in
:mod:`paddlefsl.functional`; double-differentiable op replacements in :mod:`paddlefsl.ops`.
"""

__version__ = "2.0.0.dev0"

import warnings  # noqa: E402

# ``import paddle`` warns that ccache is missing, which only matters to whoever rebuilds
# C++ extensions often; paddlefsl builds its kernels once per machine and caches them.
# One narrow filter (this message, from Paddle's modules), kept: catch_warnings() would
# also undo the filters that importing Paddle installs.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning, module="paddle")

from . import functional, metaopt, ops  # noqa: E402
from .metaopt import ANIL, MAML, BaseLearner, check_second_order  # noqa: E402

__all__ = ["MAML", "ANIL", "BaseLearner", "check_second_order", "functional", "metaopt", "ops"]
