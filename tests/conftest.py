import os
import warnings

import numpy as np
import paddle
import pytest

warnings.filterwarnings("ignore", message="When training, we now always track")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def float64():
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype(previous)


@pytest.fixture(scope="module")
def kernels():
    """paddlefsl's CPU kernels, or a skip where the library cannot be built."""
    from paddlefsl.ops import cpu_kernels, onednn

    if not cpu_kernels.usable(paddle.zeros([1])):
        pytest.skip(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    return cpu_kernels


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The kernels' thread count, 1 and 2, restored afterwards."""
    from paddlefsl.ops import onednn

    previous = onednn.get_threads()
    onednn.set_threads(request.param)
    yield request.param
    onednn.set_threads(previous)
