"""Shared test set-up: small, seeded, single-machine CPU runs."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # lets tests import tools/*.py helpers
    sys.path.insert(0, str(ROOT))

# One intra-op thread: on a 2-core machine where data-loader workers, spawned DDP ranks or
# another job compete for the cores, OpenMP's spinning threads make 2 threads many times
# slower than 1 (measured here), and the tests are small enough not to gain from 2.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
