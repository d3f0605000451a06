"""MULTIBOX_GPU_TESTS_ONLY=1 keeps the tests that use a GPU, and the ctypes
bindings' checks of the library (test_*_ctypes.py), and deselects the rest:
scripts/gpu-check runs this suite on a GPU machine within a short budget,
after CI has run the CPU tests. A test uses a GPU when a parameter of it is
a CUDA device or backend ("cuda" in its id) or when it is skipped without
one (a skipif whose reason names CUDA).

MULTIBOX_REQUIRE_GPU=1 makes those tests fail, rather than skip, where
torch sees no GPU."""

import os

import pytest
import torch

from multibox_torch import _forward_op


def _uses_gpu(item):
    if "cuda" in item.nodeid.lower():
        return True
    return any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MULTIBOX_GPU_TESTS_ONLY") != "1":
        return
    keep, drop = [], []
    for item in items:
        binding = item.path.name.endswith("_ctypes.py")
        (keep if binding or _uses_gpu(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """MULTIBOX_REQUIRE_GPU=1 (scripts/gpu-check sets it where there is a
    GPU): a test that uses one fails where it would have skipped for want
    of one, so a GPU run cannot pass by skipping its GPU tests."""
    if os.environ.get("MULTIBOX_REQUIRE_GPU") == "1" and _uses_gpu(item) and not torch.cuda.is_available():
        pytest.fail(
            f"MULTIBOX_REQUIRE_GPU=1, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device",
            pytrace=False,
        )


@pytest.fixture
def opcheck_forward():
    """``torch.library.opcheck`` of the forward op on ``args``. On CUDA its
    comparison of eager and AOT-dispatched outputs is left out: the
    workspace output holds bytes the kernels never write (the terms of
    priors that are not positive, alignment padding, the status words of
    row blocks beyond the grid), which differ between two allocations. The
    losses and gradients under torch.compile are compared with eager ones
    elsewhere."""

    def check(args):
        if args[0].is_cuda:
            utils = ("test_schema", "test_autograd_registration", "test_faketensor")
            torch.library.opcheck(_forward_op, args, test_utils=utils)
        else:
            torch.library.opcheck(_forward_op, args)

    return check


@pytest.fixture
def compile_backend():
    """The ``torch.compile`` backend of the compile tests:
    MULTIBOX_COMPILE_BACKEND, else Inductor (PyTorch's default).
    scripts/gpu-check sets ``aot_eager``: the op still goes through Dynamo,
    its fake kernel and AOTAutograd, without Inductor's code generation,
    whose first compiles take minutes on a fresh GPU machine (CI runs the
    CPU cases with Inductor)."""
    return os.environ.get("MULTIBOX_COMPILE_BACKEND", "inductor")
