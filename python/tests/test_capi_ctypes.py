"""The ctypes binding without PyTorch and without a GPU: struct layouts
against include/multibox.h (compiled with the system C compiler), and the
CPU reference entry point on the hand-computed case. Runs with pytest or
as ``python3 python/tests/test_capi_ctypes.py`` (after ``cargo build --lib``).
"""

import ctypes
import importlib.util
import math
import os
import tempfile
from pathlib import Path

from _header import check_struct_layouts, run_c

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_capi", ROOT / "python" / "multibox_torch" / "_capi.py")
capi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capi)


def test_struct_layouts_match_the_header():
    check_struct_layouts(capi.STRUCTS)


# The header's enum constants and their names in _capi.
ENUMS = {
    "MULTIBOX_F32": "F32", "MULTIBOX_F16": "F16", "MULTIBOX_BF16": "BF16",
    "MULTIBOX_I32": "I32", "MULTIBOX_I64": "I64",
    "MULTIBOX_ROW_MAJOR": "ROW_MAJOR", "MULTIBOX_CHANNEL_MAJOR": "CHANNEL_MAJOR",
    "MULTIBOX_NORMALIZE_POSITIVES": "NORMALIZE_POSITIVES",
    "MULTIBOX_NORMALIZE_GIVEN": "NORMALIZE_GIVEN",
    "MULTIBOX_NORMALIZE_PER_IMAGE": "NORMALIZE_PER_IMAGE",
}


def test_enum_values_match_the_header():
    out = run_c([f'printf("{c} %d\\n", (int){c});' for c in ENUMS])
    for line in out.splitlines():
        cname, value = line.split()
        assert getattr(capi, ENUMS[cname]) == int(value), f"{cname}: _capi.{ENUMS[cname]} != {value}"


_ABI_HASH_DEFINE = b"#define MULTIBOX_ABI_HASH "


def _declarations_hash(text):
    """multibox_abi()'s hash (src/capi.rs, declarations_hash): FNV-1a over
    the header's bytes that are neither comments, ASCII whitespace, nor the
    line that defines the hash itself (MULTIBOX_ABI_HASH)."""
    h, i, n = 0xCBF29CE484222325, 0, len(text)
    while i < n:
        pair = text[i : i + 2]
        hash_line = (i == 0 or text[i - 1] == ord("\n")) and text.startswith(_ABI_HASH_DEFINE, i)
        if pair == b"//" or hash_line:
            while i < n and text[i] != ord("\n"):
                i += 1
        elif pair == b"/*":
            end = text.find(b"*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            if text[i] not in b" \t\n\x0c\r":
                h = ((h ^ text[i]) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
            i += 1
    return h


def test_the_binding_and_the_library_are_of_the_headers_abi():
    want = _declarations_hash((ROOT / "include" / "multibox.h").read_bytes())
    assert capi.ABI == want, (
        f"include/multibox.h changed: check _capi.py's and _capi_targets.py's structs and signatures "
        f"against it, then set _capi.ABI = {want:#018X}"
    )
    # The header says so itself, for C programs.
    header = (ROOT / "include" / "multibox.h").read_text()
    assert f"\n#define MULTIBOX_ABI_HASH 0x{want:016X}ULL\n" in header
    lib = capi.Library()
    assert lib.lib.multibox_abi() == want
    # A library of another header is refused with a message that says so.
    saved = capi.ABI
    capi.ABI = saved ^ 1
    try:
        capi.Library(lib.path)
        raise AssertionError("a library of another ABI was loaded")
    except OSError as e:
        assert "built from another C header" in str(e) and "stale build" in str(e), e
        # A path given directly is not MULTIBOX_LIB: unsetting it would not
        # help (before, the message said so whether it was set or not).
        assert "MULTIBOX_LIB" not in str(e) and "Rebuild it (cargo build" in str(e), e
    finally:
        capi.ABI = saved


def test_a_stale_library_names_multibox_lib_only_when_it_came_from_there():
    saved_abi, saved_env = capi.ABI, os.environ.get("MULTIBOX_LIB")
    path = str(capi.find_library())
    capi.ABI = saved_abi ^ 1
    try:
        os.environ["MULTIBOX_LIB"] = path
        try:
            capi.Library()
            raise AssertionError("a library of another ABI was loaded")
        except OSError as e:
            assert "or unset MULTIBOX_LIB" in str(e), e
    finally:
        capi.ABI = saved_abi
        if saved_env is None:
            os.environ.pop("MULTIBOX_LIB", None)
        else:
            os.environ["MULTIBOX_LIB"] = saved_env


def test_the_checkout_lookup_takes_the_newer_of_release_and_debug():
    # Before, target/release won whenever it existed, so a `cargo build`
    # (debug) after an old release build loaded the old library. A copy of
    # _capi.py in a checkout's layout, with empty stand-ins for the builds
    # (find_library only looks at the files).
    saved_env = os.environ.pop("MULTIBOX_LIB", None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            package = Path(tmp) / "python" / "multibox_torch"
            package.mkdir(parents=True)
            (package / "_capi.py").write_bytes((ROOT / "python" / "multibox_torch" / "_capi.py").read_bytes())
            spec = importlib.util.spec_from_file_location("_capi_copy", package / "_capi.py")
            copy = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(copy)
            name = copy._library_name()
            release = Path(tmp) / "target" / "release" / name
            debug = Path(tmp) / "target" / "debug" / name
            for p in (release, debug):
                p.parent.mkdir(parents=True)
            try:
                copy.find_library()
                raise AssertionError("a library was found in an empty checkout")
            except copy.LibraryNotFound as e:
                assert str(release) in str(e) and str(debug) in str(e), e
            debug.write_bytes(b"")
            assert copy.find_library() == debug  # the only one
            release.write_bytes(b"")
            for release_time, debug_time, want in ((1000, 2000, debug), (2000, 1000, release), (1000, 1000, release)):
                os.utime(release, (release_time, release_time))
                os.utime(debug, (debug_time, debug_time))
                assert copy.find_library().resolve() == want.resolve(), (release_time, debug_time)
    finally:
        if saved_env is not None:
            os.environ["MULTIBOX_LIB"] = saved_env


def test_reference_on_the_hand_computed_case():
    lib = capi.Library()
    assert lib.version()
    b, p, c = 1, 3, 2
    confidence = (ctypes.c_float * (b * p * c))()
    predicted = (ctypes.c_float * (b * p * 4))(0.5, 0.0, 0.0, 2.0)
    gt = (ctypes.c_float * (b * p * 4))()
    labels = (ctypes.c_int64 * (b * p))(1, 0, 0)
    grad_confidence = (ctypes.c_float * (b * p * c))()
    grad_locations = (ctypes.c_float * (b * p * 4))()
    mask = (ctypes.c_uint8 * (b * p))()
    addr = ctypes.addressof
    call = capi.HostCallF32(
        shape=capi.Shape(b, p, c), label_type=capi.I64,
        confidence=addr(confidence), confidence_len=len(confidence),
        predicted_locations=addr(predicted), predicted_locations_len=len(predicted),
        labels=addr(labels), labels_len=len(labels),
        gt_locations=addr(gt), gt_locations_len=len(gt),
        g_reg=1.0, g_cls=1.0,
        grad_confidence=addr(grad_confidence), grad_confidence_len=len(grad_confidence),
        grad_locations=addr(grad_locations), grad_locations_len=len(grad_locations),
        mask=addr(mask), mask_len=len(mask),
    )
    config = lib.config(1.0, 0, 1.0)
    losses = capi.Losses()
    lib.call("multibox_reference_forward_backward_f32", ctypes.byref(config), ctypes.byref(call), ctypes.byref(losses))
    assert losses.num_pos == 1
    assert abs(losses.classification_loss - 2 * math.log(2)) < 1e-12
    assert losses.regression_loss == 1.625
    assert list(mask) == [1, 1, 0]
    assert list(grad_confidence) == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]
    assert list(grad_locations)[:4] == [0.5, 0.0, 0.0, 1.0]

    call.labels_len = 2
    try:
        lib.call("multibox_reference_forward_backward_f32", ctypes.byref(config), ctypes.byref(call), ctypes.byref(losses))
    except capi.MultiboxError as e:
        assert e.code == capi.INVALID_ARGUMENT and "labels" in str(e), e
    else:
        raise AssertionError("a wrong length was accepted")


def test_reference_layout_and_normalizer_fields():
    # The hand-computed case again, channel-major ([B, C, P] logits, [B, 4, P]
    # boxes) and divided by a given n = 4 instead of N = 1: the fields at
    # the end of multibox_host_call_f32 reach the reference.
    lib = capi.Library()
    b, p, c = 1, 3, 2
    confidence = (ctypes.c_float * (b * c * p))()
    predicted = (ctypes.c_float * (b * 4 * p))(0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0)
    gt = (ctypes.c_float * (b * 4 * p))()
    labels = (ctypes.c_int32 * (b * p))(1, 0, 0)
    grad_confidence = (ctypes.c_float * (b * c * p))()
    grad_locations = (ctypes.c_float * (b * 4 * p))()
    addr = ctypes.addressof
    call = capi.HostCallF32(
        shape=capi.Shape(b, p, c), label_type=capi.I32,
        confidence=addr(confidence), confidence_len=len(confidence),
        predicted_locations=addr(predicted), predicted_locations_len=len(predicted),
        labels=addr(labels), labels_len=len(labels),
        gt_locations=addr(gt), gt_locations_len=len(gt),
        g_reg=1.0, g_cls=1.0,
        grad_confidence=addr(grad_confidence), grad_confidence_len=len(grad_confidence),
        grad_locations=addr(grad_locations), grad_locations_len=len(grad_locations),
        layout=capi.CHANNEL_MAJOR, normalizer=capi.NORMALIZE_GIVEN, normalizer_value=4.0,
    )
    config = lib.config(1.0, 0, 1.0)
    losses = capi.Losses()
    lib.call("multibox_reference_forward_backward_f32", ctypes.byref(config), ctypes.byref(call), ctypes.byref(losses))
    assert losses.num_pos == 1
    assert abs(losses.classification_loss - 2 * math.log(2) / 4) < 1e-12
    assert losses.regression_loss == 1.625 / 4
    # [C, P]: class 0 then class 1 of priors 0, 1, 2.
    assert list(grad_confidence) == [0.125, -0.125, 0.0, -0.125, 0.125, 0.0]
    assert list(grad_locations) == [0.125, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0]
    call.normalizer = 3
    try:
        lib.call("multibox_reference_forward_f32", ctypes.byref(config), ctypes.byref(call), ctypes.byref(losses))
    except capi.MultiboxError as e:
        assert e.code == capi.INVALID_ARGUMENT and "normalizer" in str(e), e
    else:
        raise AssertionError("normalizer 3 was accepted")


def test_workspace_and_no_device():
    lib = capi.Library()
    assert lib.workspace_bytes(4, 3000, 21) > 0
    out = ctypes.c_void_p()
    config = lib.config(3.0, 0, 1.0)
    code = lib.lib.multibox_loss_create(0, ctypes.byref(config), ctypes.byref(out))
    # NO_DEVICE only where a GPU is not required (MULTIBOX_REQUIRE_GPU=1).
    allowed = (capi.OK,) if os.environ.get("MULTIBOX_REQUIRE_GPU") == "1" else (capi.OK, capi.NO_DEVICE)
    assert code in allowed, (code, lib.last_error())
    if code == capi.OK:
        lib.call("multibox_loss_destroy", out)


if __name__ == "__main__":
    for name, f in list(globals().items()):
        if name.startswith("test_"):
            f()
            print("ok", name)
