import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when tests run in parallel processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A fresh, seeded CPU generator (tests never touch torch's global RNG)."""
    return torch.Generator().manual_seed(1234)
