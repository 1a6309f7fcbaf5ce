import pytest
from train_helpers import Factory, synthetic_classes


@pytest.fixture(scope="session")
def splits():
    images, labels = synthetic_classes()
    cut = 12 * 10  # 12 training classes, 8 validation classes
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:] - 12)


@pytest.fixture
def factory(splits):
    return Factory(splits)
