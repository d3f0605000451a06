"""MULTIBOX_GPU_TESTS_ONLY=1 keeps the tests that use a GPU, and the ctypes
bindings' checks of the library (test_*_ctypes.py), and deselects the rest:
scripts/gpu-check runs this suite on a GPU machine within a short budget,
after CI has run the CPU tests. A test uses a GPU when a parameter of it is
a CUDA device or backend ("cuda" in its id) or when it is skipped without
one (a skipif whose reason names CUDA)."""

import os


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
