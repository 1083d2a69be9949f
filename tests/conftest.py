import pytest
import torch

# The tests' tensors are small: on a 2-core machine intra-op threads only add contention
# (measured 10-40x slower elementwise ops with 2 threads under load). Spawned ranks do the same.
torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh, seeded CPU generator (tests never touch torch's global RNG)."""
    return torch.Generator().manual_seed(1234)
