"""Builds the multibox crate's shared library with cargo and bundles it in
the ``multibox_torch`` package (as ``multibox_torch/_libmultibox*.so``).

setuptools-rust, not maturin: the package loads a plain C-ABI cdylib with
ctypes, and setuptools-rust's ``Binding.NoBinding`` is made for exactly that
(cargo builds the cdylib, the file is copied into the package, no Python
binding layer); maturin's modes expect PyO3, cffi, UniFFI or a binary.

The crate lives one directory up, so build from a checkout of the
repository: ``pip install ./python`` or ``python -m build --wheel python``
(an sdist of this directory alone would not contain the crate).

The CUDA kernels are compiled at build time by NVRTC (build.rs). Unless
``MULTIBOX_NVRTC`` points at a libnvrtc or ``MULTIBOX_SKIP_KERNELS=1``, this
runs the repository's ``scripts/setup``, which installs the pinned NVRTC
from PyPI into ``.cuda/`` once.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MANIFEST = ROOT / "Cargo.toml"


def crate_version():
    """The `version` of Cargo.toml's [package] table: the package's version."""
    if not MANIFEST.exists():
        sys.exit(
            f"multibox-torch: {MANIFEST} not found. Build from a checkout of the multibox repository "
            "(`pip install ./python` at its root); an sdist of python/ alone does not contain the crate."
        )
    text = MANIFEST.read_text()
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    version = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not version:
        sys.exit(f"multibox-torch: no version in the [package] table of {MANIFEST}")
    return version.group(1)


def ensure_nvrtc():
    """build.rs needs NVRTC; fetch the pinned one unless told otherwise."""
    if os.environ.get("MULTIBOX_NVRTC") or os.environ.get("MULTIBOX_SKIP_KERNELS") == "1":
        return
    setup_script = ROOT / "scripts" / "setup"
    result = subprocess.run(["bash", str(setup_script)], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(
            f"multibox-torch: {setup_script} could not install NVRTC into {ROOT / '.cuda'} "
            "(it needs python3 with pip and access to PyPI). Set MULTIBOX_NVRTC to a libnvrtc.so "
            "to use another, or MULTIBOX_SKIP_KERNELS=1 for a CPU-only build."
        )


def library_wheel():
    """The bdist_wheel command, tagging the wheel py3-none-<platform>: the
    package is Python beside a C-ABI library that links no Python (ctypes
    loads it), so one wheel serves every Python 3 on its platform, not only
    the interpreter that built it. Imported here, after the checks above:
    outside a checkout setup.py stops before it needs the wheel machinery."""
    from setuptools.command.bdist_wheel import bdist_wheel

    class LibraryWheel(bdist_wheel):
        def get_tag(self):
            _, _, platform = super().get_tag()
            return "py3", "none", platform

    return LibraryWheel


# The checkout first: outside one (an sdist of python/ alone) there is no
# scripts/setup either, and its failure would be reported as NVRTC's.
version = crate_version()
ensure_nvrtc()

setup(
    version=version,
    cmdclass={"bdist_wheel": library_wheel()},
    rust_extensions=[
        RustExtension(
            "multibox_torch._libmultibox",
            path=str(MANIFEST),
            binding=Binding.NoBinding,
            # The crate's .cargo/config.toml picks the CUDA API version for
            # cudarc; cargo finds it from this directory, inside the checkout.
        )
    ],
)
