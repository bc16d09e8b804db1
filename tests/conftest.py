"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before the
test modules import fastattn's kernels.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test tensors are tiny: a second intra-op thread only adds contention on small CI machines.
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def device() -> str:
    """Where kernels run: the GPU when present, else CPU tensors through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_selections():
    # Tests replace backends' capabilities and machine checks: no choice outlives a test.
    from fastattn.backends import forget_selections  # imported late: TRITON_INTERPRET is set first

    forget_selections()
    yield


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reported seed per test: fresh inputs, yet any failure can be replayed.
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes
    torch.manual_seed(seed)
    yield
