"""ctypes binding of the multibox C ABI (include/multibox.h). No PyTorch here.

The library is, in order: ``$MULTIBOX_LIB`` if set (an override: it must
exist), else the one bundled in this package by ``pip install`` (built by
cargo through setuptools-rust, ``_libmultibox*.so``), else, for a source
checkout used without installing, the newer of the repository's
``target/release`` and ``target/debug`` builds (after ``cargo build --release
--lib`` or ``cargo build --lib``).
"""

import ctypes
import os
import sys
from pathlib import Path

OK = 0
INVALID_ARGUMENT = 1
NO_DEVICE = 2
NO_KERNELS = 3
CUDA_ERROR = 4
PANIC = 5
CODE_NAMES = {
    OK: "MULTIBOX_OK",
    INVALID_ARGUMENT: "MULTIBOX_INVALID_ARGUMENT",
    NO_DEVICE: "MULTIBOX_NO_DEVICE",
    NO_KERNELS: "MULTIBOX_NO_KERNELS",
    CUDA_ERROR: "MULTIBOX_CUDA_ERROR",
    PANIC: "MULTIBOX_PANIC",
}

# multibox_abi() of a library built from the include/multibox.h that the
# structs and signatures here (and in _capi_targets) mirror: a hash of its
# declarations, comments and whitespace left out. A library of another
# header is refused instead of being handed structs of the wrong layout.
# python/tests/test_capi_ctypes.py fails when the header changes: check the
# structs against it, then set the value the test prints.
ABI = 0xE3F65D31A65856A7

F32, F16, BF16 = 0, 1, 2
I32, I64 = 0, 1
# multibox_layout: confidence [B, P, C] and locations [B, P, 4], or
# [B, C, P] and [B, 4, P] (gradients in the same layout).
ROW_MAJOR, CHANNEL_MAJOR = 0, 1
# multibox_normalizer: what the losses and gradients are divided by.
NORMALIZE_POSITIVES, NORMALIZE_GIVEN, NORMALIZE_PER_IMAGE = 0, 1, 2


class Shape(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_size_t),
        ("priors", ctypes.c_size_t),
        ("classes", ctypes.c_size_t),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("neg_pos_ratio", ctypes.c_float),
        ("min_negatives_per_image", ctypes.c_uint32),
        ("beta", ctypes.c_float),
    ]


class Call(ctypes.Structure):
    _fields_ = [
        ("shape", Shape),
        ("dtype", ctypes.c_int32),
        ("label_type", ctypes.c_int32),
        ("confidence", ctypes.c_uint64),
        ("predicted_locations", ctypes.c_uint64),
        ("labels", ctypes.c_uint64),
        ("gt_locations", ctypes.c_uint64),
        ("grad_confidence", ctypes.c_uint64),
        ("grad_locations", ctypes.c_uint64),
        ("regression_loss", ctypes.c_uint64),
        ("classification_loss", ctypes.c_uint64),
        ("num_pos", ctypes.c_uint64),
        ("mask", ctypes.c_uint64),
        ("workspace", ctypes.c_uint64),
        ("workspace_bytes", ctypes.c_size_t),
        ("upstream", ctypes.c_uint64),
        ("g_reg", ctypes.c_float),
        ("g_cls", ctypes.c_float),
        ("layout", ctypes.c_int32),
        ("normalizer", ctypes.c_int32),
        ("normalizer_value", ctypes.c_float),
        ("normalizer_device", ctypes.c_uint64),
    ]


class DeviceStatus(ctypes.Structure):
    _fields_ = [
        ("invalid_label", ctypes.c_bool),
        ("nonfinite_input", ctypes.c_bool),
        ("stale_workspace", ctypes.c_bool),
    ]


class HostCallF32(ctypes.Structure):
    _fields_ = [
        ("shape", Shape),
        ("label_type", ctypes.c_int32),
        ("confidence", ctypes.c_void_p),
        ("confidence_len", ctypes.c_size_t),
        ("predicted_locations", ctypes.c_void_p),
        ("predicted_locations_len", ctypes.c_size_t),
        ("labels", ctypes.c_void_p),
        ("labels_len", ctypes.c_size_t),
        ("gt_locations", ctypes.c_void_p),
        ("gt_locations_len", ctypes.c_size_t),
        ("g_reg", ctypes.c_float),
        ("g_cls", ctypes.c_float),
        ("grad_confidence", ctypes.c_void_p),
        ("grad_confidence_len", ctypes.c_size_t),
        ("grad_locations", ctypes.c_void_p),
        ("grad_locations_len", ctypes.c_size_t),
        ("mask", ctypes.c_void_p),
        ("mask_len", ctypes.c_size_t),
        ("layout", ctypes.c_int32),
        ("normalizer", ctypes.c_int32),
        ("normalizer_value", ctypes.c_float),
    ]


class Losses(ctypes.Structure):
    _fields_ = [
        ("regression_loss", ctypes.c_double),
        ("classification_loss", ctypes.c_double),
        ("num_pos", ctypes.c_uint64),
    ]


# Every struct above, by its C name, for the layout check in the tests.
STRUCTS = {
    "multibox_shape": Shape,
    "multibox_config": Config,
    "multibox_call": Call,
    "multibox_device_status": DeviceStatus,
    "multibox_host_call_f32": HostCallF32,
    "multibox_losses": Losses,
}


class MultiboxError(RuntimeError):
    """A multibox call failed; ``code`` is its multibox_status_code."""

    def __init__(self, function, code, message):
        self.code = code
        name = CODE_NAMES.get(code, str(code))
        super().__init__(f"{function}: {name}: {message}")


def _library_name():
    if sys.platform == "darwin":
        return "libmultibox.dylib"
    if sys.platform == "win32":
        return "multibox.dll"
    return "libmultibox.so"


class LibraryNotFound(FileNotFoundError):
    """The multibox library is not where it was looked for."""


def _bundled(here):
    """The library that `pip install` put in the package, if any. Its name
    carries the interpreter's extension suffix of the build
    (``_libmultibox.cpython-311-x86_64-linux-gnu.so``); it links no Python,
    so any such file in the package will do."""
    found = sorted(p for p in here.glob("_libmultibox*") if p.suffix in (".so", ".dylib", ".pyd", ".dll"))
    return found[0] if found else None


def find_library():
    """The path of the multibox shared library this package will load."""
    env = os.environ.get("MULTIBOX_LIB")
    if env:
        path = Path(env)
        if not path.is_file():
            raise LibraryNotFound(
                f"MULTIBOX_LIB is set to {env!r}, which is not a file; point it at libmultibox.so "
                "(from `cargo build --release --lib`: target/release/libmultibox.so) or unset it "
                "to use the library bundled with the package"
            )
        return path
    here = Path(__file__).resolve().parent
    bundled = _bundled(here)
    if bundled is not None:
        return bundled
    name = _library_name()
    repo = here.parent.parent
    candidates = [repo / "target" / "release" / name, repo / "target" / "debug" / name]
    newest = _newest(candidates)
    if newest is not None:
        return newest
    looked = [str(here / "_libmultibox*.so")] + [str(p) for p in candidates]
    raise LibraryNotFound(
        f"the multibox library was not found (looked for {', '.join(looked)}). Install the package "
        "with `pip install ./python` from the repository (it builds and bundles the library), "
        "or build it with `cargo build --release --lib` and set MULTIBOX_LIB to its path"
    )


def _newest(paths):
    """The most recently modified of ``paths`` that exist (the first of those
    modified together), or None: of a checkout's release and debug builds,
    the one built last, rather than a release build left from long ago."""
    found = [p for p in paths if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _rebuild_hint(path, from_env):
    """What to do about a library at ``path`` that is not this package's:
    the build that makes it again, and unsetting MULTIBOX_LIB only when that
    is where the path came from."""
    if path.name.startswith("_libmultibox"):
        hint = "reinstall the package (pip install ./python)"
    elif path.parent.name == "debug":
        hint = "rebuild it (cargo build --lib)"
    else:
        hint = "rebuild it (cargo build --release --lib)"
    return f"{hint} or unset MULTIBOX_LIB" if from_env else hint


_P = ctypes.POINTER


def _declare(lib):
    c = ctypes
    sigs = {
        "multibox_version": (c.c_char_p, []),
        "multibox_abi": (c.c_uint64, []),
        "multibox_last_error": (c.c_char_p, []),
        "multibox_config_default": (c.c_int, [_P(Config)]),
        "multibox_workspace_bytes": (c.c_int, [c.c_size_t, c.c_size_t, c.c_size_t, _P(c.c_size_t)]),
        "multibox_loss_create": (c.c_int, [c.c_int32, _P(Config), _P(c.c_void_p)]),
        "multibox_loss_destroy": (c.c_int, [c.c_void_p]),
        "multibox_forward": (c.c_int, [c.c_void_p, _P(Call), c.c_void_p]),
        "multibox_forward_backward": (c.c_int, [c.c_void_p, _P(Call), c.c_void_p]),
        "multibox_backward": (c.c_int, [c.c_void_p, _P(Call), c.c_void_p]),
        "multibox_status": (
            c.c_int,
            [c.c_void_p, _P(Shape), c.c_uint64, c.c_size_t, c.c_void_p, _P(DeviceStatus)],
        ),
        "multibox_reference_forward_f32": (c.c_int, [_P(Config), _P(HostCallF32), _P(Losses)]),
        "multibox_reference_forward_backward_f32": (
            c.c_int,
            [_P(Config), _P(HostCallF32), _P(Losses)],
        ),
        "multibox_reference_backward_f32": (c.c_int, [_P(Config), _P(HostCallF32), _P(Losses)]),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes


class Library:
    """The loaded library; ``call(name, *args)`` raises MultiboxError on failure."""

    def __init__(self, path=None):
        self.path = Path(path) if path else find_library()
        from_env = bool(os.environ.get("MULTIBOX_LIB")) and not path
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            source = "MULTIBOX_LIB" if from_env else "the package"
            raise OSError(f"could not load the multibox library {self.path} (from {source}): {e}") from e
        try:
            _declare(self.lib)
        except AttributeError as e:
            raise OSError(
                f"{self.path} is not a multibox library of this package's version "
                f"(a C function is missing: {e}); {_rebuild_hint(self.path, from_env)}"
            ) from e
        abi = self.lib.multibox_abi()
        if abi != ABI:
            hint = _rebuild_hint(self.path, from_env)
            raise OSError(
                f"{self.path} was built from another C header than this package's "
                f"(multibox_abi() {abi:#018x}, the package's {ABI:#018x}): a stale build? "
                f"{hint[:1].upper()}{hint[1:]}"
            )

    def version(self):
        return self.lib.multibox_version().decode()

    def last_error(self):
        return self.lib.multibox_last_error().decode(errors="replace")

    def call(self, name, *args):
        code = getattr(self.lib, name)(*args)
        if code != OK:
            raise MultiboxError(name, code, self.last_error())

    def workspace_bytes(self, batch, priors, classes):
        out = ctypes.c_size_t()
        self.call("multibox_workspace_bytes", batch, priors, classes, ctypes.byref(out))
        return out.value

    def config(self, neg_pos_ratio, min_negatives_per_image, beta):
        return Config(neg_pos_ratio, min_negatives_per_image, beta)


_library = None


def library():
    """The process's one Library (loaded on first use)."""
    global _library
    if _library is None:
        _library = Library()
    return _library
