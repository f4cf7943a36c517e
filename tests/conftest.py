"""Shared fixtures.

Without a CUDA GPU, triton's kernels run through its interpreter (tests/kernels/test_triton.py). That must
be switched on before anything imports triton: triton decides per function at import time, and other
packages import it early (diffusers imports torchao, which imports triton, where torchao is installed).
"""

import importlib.util
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's barriers make a
    forward pass 10-50x slower. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
