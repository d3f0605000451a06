"""ctypes binding of the target-assignment part of the C ABI
(include/multibox.h, ``multibox_target_*`` and ``multibox_assigner_*``).
No PyTorch here; the library is the one ``_capi`` loads.
"""

import ctypes

try:  # as part of the package
    from . import _capi
except ImportError:  # loaded by path (the torch-free tests)
    import _capi  # type: ignore

PRIORS_SSDLITE300 = 0
PRIORS_SSD300 = 1


class TargetConfig(ctypes.Structure):
    _fields_ = [
        ("iou_threshold", ctypes.c_float),
        ("center_variance", ctypes.c_float),
        ("size_variance", ctypes.c_float),
        ("num_classes", ctypes.c_uint32),
    ]


class TargetShape(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_size_t),
        ("priors", ctypes.c_size_t),
        ("max_boxes", ctypes.c_size_t),
    ]


class TargetCall(ctypes.Structure):
    _fields_ = [
        ("shape", TargetShape),
        ("dtype", ctypes.c_int32),
        ("label_type", ctypes.c_int32),
        ("priors", ctypes.c_uint64),
        ("gt_boxes", ctypes.c_uint64),
        ("gt_labels", ctypes.c_uint64),
        ("gt_counts", ctypes.c_uint64),
        ("labels", ctypes.c_uint64),
        ("gt_locations", ctypes.c_uint64),
        ("workspace", ctypes.c_uint64),
        ("workspace_bytes", ctypes.c_size_t),
    ]


class TargetStatus(ctypes.Structure):
    _fields_ = [
        ("count_clamped", ctypes.c_bool),
        ("invalid_box_label", ctypes.c_bool),
        ("degenerate_box", ctypes.c_bool),
    ]


class TargetHostCall(ctypes.Structure):
    _fields_ = [
        ("shape", TargetShape),
        ("label_type", ctypes.c_int32),
        ("priors", ctypes.c_void_p),
        ("priors_len", ctypes.c_size_t),
        ("gt_boxes", ctypes.c_void_p),
        ("gt_boxes_len", ctypes.c_size_t),
        ("gt_labels", ctypes.c_void_p),
        ("gt_labels_len", ctypes.c_size_t),
        ("gt_counts", ctypes.c_void_p),
        ("gt_counts_len", ctypes.c_size_t),
        ("labels", ctypes.c_void_p),
        ("labels_len", ctypes.c_size_t),
        ("gt_locations", ctypes.c_void_p),
        ("gt_locations_len", ctypes.c_size_t),
    ]


# Every struct above, by its C name, for the layout check in the tests.
STRUCTS = {
    "multibox_target_config": TargetConfig,
    "multibox_target_shape": TargetShape,
    "multibox_target_call": TargetCall,
    "multibox_target_status": TargetStatus,
    "multibox_target_host_call": TargetHostCall,
}

_P = ctypes.POINTER
_declared = set()


def library():
    """The process's Library, with the target functions declared on it."""
    lib = _capi.library()
    if id(lib) not in _declared:
        declare(lib)
        _declared.add(id(lib))
    return lib


def declare(library):
    """Declares the target functions' signatures on a ``_capi.Library``."""
    c = ctypes
    sigs = {
        "multibox_target_config_default": (c.c_int, [_P(TargetConfig)]),
        "multibox_target_workspace_bytes": (
            c.c_int,
            [c.c_size_t, c.c_size_t, c.c_size_t, _P(c.c_size_t)],
        ),
        "multibox_standard_priors": (c.c_int, [c.c_int32, c.c_void_p, c.c_size_t, _P(c.c_size_t)]),
        "multibox_assigner_create": (
            c.c_int,
            [c.c_int32, c.c_void_p, c.c_size_t, _P(TargetConfig), _P(c.c_void_p)],
        ),
        "multibox_assigner_destroy": (c.c_int, [c.c_void_p]),
        "multibox_assign_targets": (c.c_int, [c.c_void_p, _P(TargetCall), c.c_void_p]),
        "multibox_assigner_status": (
            c.c_int,
            [c.c_void_p, _P(TargetShape), c.c_uint64, c.c_size_t, c.c_void_p, _P(TargetStatus)],
        ),
        "multibox_reference_assign_targets": (
            c.c_int,
            [_P(TargetConfig), _P(TargetHostCall), _P(TargetStatus)],
        ),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(library.lib, name)
        f.restype = restype
        f.argtypes = argtypes


def workspace_bytes(batch, priors, max_boxes):
    """Bytes of device workspace one assignment of this shape needs."""
    lib = library()
    out = ctypes.c_size_t()
    lib.call("multibox_target_workspace_bytes", batch, priors, max_boxes, ctypes.byref(out))
    return out.value


def standard_priors(kind):
    """The standard priors ``kind`` (PRIORS_SSDLITE300, PRIORS_SSD300) as a
    ctypes float array of P*4 values, center form."""
    lib = library()
    n = ctypes.c_size_t()
    lib.call("multibox_standard_priors", kind, None, 0, ctypes.byref(n))
    out = (ctypes.c_float * n.value)()
    lib.call("multibox_standard_priors", kind, ctypes.addressof(out), n.value, ctypes.byref(n))
    return out
