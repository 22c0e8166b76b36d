"""Test configuration: run the Triton kernels under the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before medmap_fast's kernel
modules are imported, which is why this happens at the very top of the first conftest.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine every small op otherwise waits for the busy second core (test_swin3d.py ran 7x slower
    with 2 threads). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
