import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
MNIST_TEST_IMAGES = os.path.join(SHARED_DATA, "MNIST", "raw", "t10k-images-idx3-ubyte")  # present when real MNIST is


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny tensors on
    a shared 2-core machine run faster without oversubscription; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
