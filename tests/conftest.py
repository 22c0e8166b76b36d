"""Test configuration: run the Triton kernels under the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before medmap_fast's kernel
modules are imported, which is why this happens at the very top of the first conftest.
"""

import json
import os
import subprocess
import sys

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


@pytest.fixture
def compiled_for_hopper(tmp_path):
    """``compiled_for_hopper(script, *args, timeout=900)``: the JSON that ``script`` of bench/ (one that compiles the
    kernels for sm_90, no GPU needed) writes with ``--json``, run in a fresh process with the Triton interpreter off;
    skips where this Triton build has no NVIDIA backend (ptxas)."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build carries no NVIDIA backend (ptxas) to compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"

    def run(script: str, *args: str, timeout: int = 900):
        path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", script)
        done = subprocess.run([sys.executable, path, *args, "--json", str(out)], capture_output=True, text=True,
                              env=env, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(out.read_text())

    return run
