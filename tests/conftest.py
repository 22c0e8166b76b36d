"""Test configuration: run the Triton kernels under the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before medmap_fast's kernel
modules are imported, which is why this happens at the very top of the first conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
