import os

import pytest
import torch

# The small test models gain nothing from several threads, and idle OpenMP threads spinning
# against another busy process slow small matmuls down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture
def threads():
    """Use every core for a test on a real model; back to one thread afterwards."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(1)
