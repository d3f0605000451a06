"""The target-assignment part of the ctypes binding, without PyTorch and
without a GPU: struct layouts against include/multibox.h, the CPU reference
entry point on every target golden case, the standard priors, and the
refusals. Runs with pytest or as ``python3 python/tests/test_targets_ctypes.py``
(after ``cargo build --lib``).
"""

import ctypes
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "python" / "multibox_torch"
sys.path.insert(0, str(PKG))  # `import _capi` for _capi_targets loaded by path

from _header import check_struct_layouts  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(name, PKG / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


capi = _load("_capi")
tcapi = _load("_capi_targets")
COMMITTED = ROOT / "tests" / "goldens-targets"
GOLDENS = Path(os.environ.get("MULTIBOX_TARGET_GOLDENS", COMMITTED))


def test_struct_layouts_match_the_header():
    check_struct_layouts(tcapi.STRUCTS)


def _case_names(folder):
    """cases.json's list, else every subfolder with a case.json."""
    listing = folder / "cases.json"
    if listing.exists():
        return json.loads(listing.read_text())
    return sorted(p.name for p in folder.iterdir() if (p / "case.json").exists())


def _array(path, ctype):
    data = path.read_bytes()
    n = len(data) // ctypes.sizeof(ctype)
    arr = (ctype * n)()
    ctypes.memmove(arr, data, len(data))
    return arr


def test_reference_matches_every_golden_case():
    lib = tcapi.library()
    names = _case_names(GOLDENS)
    assert names, f"no target golden case in {GOLDENS}"
    for name in names:
        d = GOLDENS / name
        meta = json.loads((d / "case.json").read_text())
        lt = ctypes.c_int64 if meta["label_dtype"] == "i64" else ctypes.c_int32
        b, p, t = meta["batch"], meta["priors"], meta["max_boxes"]
        priors = _array(d / "priors.bin", ctypes.c_float)
        boxes = _array(d / "gt_boxes.bin", ctypes.c_float)
        box_labels = _array(d / "gt_labels.bin", lt)
        counts = _array(d / "gt_counts.bin", ctypes.c_int32)
        want_labels = _array(d / "labels.bin", lt)
        want_loc = _array(d / "gt_locations.bin", ctypes.c_float)
        labels = (lt * (b * p))()
        loc = (ctypes.c_float * (b * p * 4))()
        addr = ctypes.addressof
        call = tcapi.TargetHostCall(
            shape=tcapi.TargetShape(b, p, t),
            label_type=capi.I64 if lt is ctypes.c_int64 else capi.I32,
            priors=addr(priors), priors_len=len(priors),
            gt_boxes=addr(boxes), gt_boxes_len=len(boxes),
            gt_labels=addr(box_labels), gt_labels_len=len(box_labels),
            gt_counts=addr(counts), gt_counts_len=len(counts),
            labels=addr(labels), labels_len=len(labels),
            gt_locations=addr(loc), gt_locations_len=len(loc),
        )
        config = tcapi.TargetConfig()
        lib.call("multibox_target_config_default", ctypes.byref(config))
        config.iou_threshold = meta["iou_threshold"]
        config.center_variance = meta["center_variance"]
        config.size_variance = meta["size_variance"]
        status = tcapi.TargetStatus()
        lib.call("multibox_reference_assign_targets", ctypes.byref(config), ctypes.byref(call), ctypes.byref(status))
        assert list(labels) == list(want_labels), f"{name}: labels differ"
        for i, (g, w) in enumerate(zip(loc, want_loc)):
            assert abs(g - w) <= 1e-6 * max(1.0, abs(w)), f"{name}: gt_locations[{i}] {g} vs {w}"

        call.gt_locations_len -= 1
        try:
            lib.call("multibox_reference_assign_targets", ctypes.byref(config), ctypes.byref(call), None)
        except capi.MultiboxError as e:
            assert e.code == capi.INVALID_ARGUMENT and "gt_locations" in str(e), e
        else:
            raise AssertionError("a short output was accepted")


def test_standard_priors_are_the_goldens_priors():
    ssdlite = tcapi.standard_priors(tcapi.PRIORS_SSDLITE300)
    ssd300 = tcapi.standard_priors(tcapi.PRIORS_SSD300)
    assert len(ssdlite) == 3000 * 4 and len(ssd300) == 8732 * 4
    for name, generated in (("t_ssdlite_voc", ssdlite), ("t_ssd300", ssd300)):
        golden = (COMMITTED / name / "priors.bin").read_bytes()
        assert bytes(generated) == golden, name


def test_workspace_and_no_device():
    lib = tcapi.library()
    assert tcapi.workspace_bytes(32, 8732, 100) >= 32 * 8732 * 8
    priors = tcapi.standard_priors(tcapi.PRIORS_SSDLITE300)
    out = ctypes.c_void_p()
    code = lib.lib.multibox_assigner_create(0, ctypes.addressof(priors), len(priors), None, ctypes.byref(out))
    # NO_DEVICE only where a GPU is not required (MULTIBOX_REQUIRE_GPU=1).
    allowed = (capi.OK,) if os.environ.get("MULTIBOX_REQUIRE_GPU") == "1" else (capi.OK, capi.NO_DEVICE)
    assert code in allowed, (code, lib.last_error())
    if code == capi.OK:
        lib.call("multibox_assigner_destroy", out)
    bad = tcapi.TargetConfig(0.0, 0.1, 0.2, 0)
    code = lib.lib.multibox_assigner_create(0, ctypes.addressof(priors), len(priors), ctypes.byref(bad), ctypes.byref(out))
    assert code == capi.INVALID_ARGUMENT and out.value is None


if __name__ == "__main__":
    for name, f in list(globals().items()):
        if name.startswith("test_"):
            f()
            print("ok", name)
