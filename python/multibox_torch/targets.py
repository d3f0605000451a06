"""Target assignment (prior matching and box encoding) as a PyTorch custom
op, and ``MultiboxLoss``, a drop-in for the reference training code's module.

    from multibox_torch import MultiboxLoss, pad_targets
    criterion = MultiboxLoss(config.priors, iou_threshold=0.5, neg_pos_ratio=3,
                             center_variance=0.1, size_variance=0.2, device=device)
    # In the DataLoader's collate_fn, on CPU tensors (and pin_memory=True):
    gt_boxes, gt_labels, gt_counts = pad_targets(boxes_per_image, labels_per_image)
    # In the step: pinned copies, so the host does not wait for the GPU.
    gt_boxes, gt_labels, gt_counts = (t.to("cuda", non_blocking=True) for t in (gt_boxes, gt_labels, gt_counts))
    labels, gt_locations = criterion.assign(gt_boxes, gt_labels, gt_counts)
    regression_loss, classification_loss = criterion(confidence, locations, labels, gt_locations)

The assignment is the reference's ``MatchPrior`` (SPEC.md, "Target
assignment"), for a whole padded batch at once: on CUDA tensors the crate's
kernels on the current stream (no host synchronisation once a priors
tensor has been checked on the host, at its first use and after an
in-place write; capturable in a CUDA graph), on CPU tensors the crate's CPU reference. Either way the labels
equal the reference's float32 labels bit for bit.
"""

import ctypes
import numbers
import operator
import weakref
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _capi, _capi_targets

# From the package, which defines them before it imports this module.
from . import (
    _F32_HALF_TINY, _F32_MAX, _check_tensors, _check_type, _check_value, _loss_and_record, _not_during_capture,
    _real_setting, _wait_for_status,
)

__all__ = ["assign_targets", "pad_targets", "standard_priors", "MultiboxLoss", "TargetStatus"]

_LABEL_TYPES = {torch.int32: _capi.I32, torch.int64: _capi.I64}

# (device index, iou_threshold, center_variance, size_variance, num_classes)
# -> multibox_assigner*. An assigner loads the kernels once per device and
# settings and lives as long as the process. Every call passes its own
# priors tensor, so one assigner serves any priors.
_assigners = {}

# The CUDA priors tensors checked on the host so far (the kernels read the
# priors unchecked): (device, data_ptr, shape, strides, dtype) -> (a weak
# reference to the tensor, its version counter then). A tensor is checked
# again when it was written since (in place: the counter moved) or when
# another tensor took its place at that address (the entry's tensor was
# freed, which removes the entry). Priors are usually one constant tensor
# made once, so this copies them to the host once.
_checked_priors = {}


class TargetStatus(NamedTuple):
    """What target assignment recorded about its inputs
    (``MultiboxLoss.last_assign_status()``; the C ABI's
    ``multibox_target_status``). None of them stops the assignment."""

    #: A ``gt_counts[b]`` outside ``0..T``: clamped.
    count_clamped: bool
    #: A box label below 1 (or, with ``num_classes=C``, one ``>= C``): its
    #: priors get -2 (the label itself when ``>= C``), which the loss refuses
    #: (NaN losses on CUDA, MultiboxError on the CPU).
    invalid_box_label: bool
    #: A non-finite box, or one with ``x1 <= x0`` or ``y1 <= y0``: skipped.
    degenerate_box: bool


def standard_priors(name: str = "ssdlite300") -> Tensor:
    """The standard SSD priors ``[P, 4]`` (center form, float32, CPU),
    bit-identical to the reference's ``config.priors``: ``"ssdlite300"``
    (the MobileNet SSD / SSDLite configs, 3000 priors) or ``"ssd300"`` (VGG,
    8732 priors)."""
    kinds = {"ssdlite300": _capi_targets.PRIORS_SSDLITE300, "ssd300": _capi_targets.PRIORS_SSD300}
    if name not in kinds:
        raise ValueError(f"unknown priors {name!r}: expected one of {sorted(kinds)}")
    values = _capi_targets.standard_priors(kinds[name])
    return torch.frombuffer(bytearray(values), dtype=torch.float32).reshape(-1, 4)


def _to_device(host, device):
    """A host tensor on ``device``; to CUDA from pinned memory without
    waiting (a pageable copy would make the host wait for everything
    queued on the stream; the caching host allocator keeps the pinned
    block until the copy has run). Other devices (meta, say) get a plain
    copy, so that all three outputs share the boxes' device."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def pad_targets(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    max_boxes: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pads per-image boxes ``[n_b, 4]`` (corner form) and labels ``[n_b]``
    into ``(gt_boxes [B, T, 4] float32, gt_labels [B, T], gt_counts [B] int32)``,
    on the device of the first tensor. ``T`` is ``max_boxes`` if given (it
    must hold every image), else the largest count (at least 1). The labels
    keep the first image's integer type (int64 or int32). An image without
    boxes is ``[0, 4]`` (or ``torch.tensor([])``). Padding rows hold zeros;
    the assignment never reads them.

    The counts, and the rows the boxes go to, come from the host. On CUDA
    they are copied from pinned memory without waiting for the stream (the
    boxes are then placed by one scatter per output, whatever B), but a
    CUDA graph would replay those copies from buffers long gone, so a
    capture raises RuntimeError: pad before it. Cheapest of all is padding
    CPU tensors in the DataLoader's ``collate_fn`` with ``pin_memory=True``,
    then moving the three with ``.to(device, non_blocking=True)``."""
    if len(boxes) != len(labels):
        raise ValueError(f"pad_targets: {len(boxes)} box tensors but {len(labels)} label tensors")
    if len(boxes) == 0:
        raise ValueError("pad_targets needs at least one image")
    counts = []
    boxes = list(boxes)
    for i, (b, l) in enumerate(zip(boxes, labels)):
        _check_tensors("pad_targets", **{f"boxes[{i}]": b, f"labels[{i}]": l})
        if b.dim() == 1 and b.numel() == 0:
            boxes[i] = b = b.reshape(0, 4)  # torch.tensor([]): an image without boxes
        if b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"pad_targets: image {i}'s boxes must be [n, 4], got {tuple(b.shape)}")
        if l.dim() != 1 or l.shape[0] != b.shape[0]:
            raise ValueError(f"pad_targets: image {i}'s labels must be [{b.shape[0]}], got {tuple(l.shape)}")
        if l.dtype not in _LABEL_TYPES:
            raise TypeError(f"pad_targets: image {i}'s labels must be int64 or int32, got {l.dtype}")
        counts.append(int(b.shape[0]))
    longest = max(counts)
    if max_boxes is None:
        t = max(1, longest)
    elif isinstance(max_boxes, bool):
        raise TypeError(f"pad_targets: max_boxes must be None or an integer, got {max_boxes!r}")
    else:
        try:
            t = operator.index(max_boxes)
        except TypeError:
            raise TypeError(f"pad_targets: max_boxes must be None or an integer, got {max_boxes!r}") from None
    if t < 1:
        raise ValueError(
            f"pad_targets: max_boxes={max_boxes}: T must be at least 1 (an image without boxes takes one padding row)"
        )
    if t < longest:
        raise ValueError(f"pad_targets: max_boxes={max_boxes} is smaller than an image's {longest} boxes")
    device = boxes[0].device
    if device.type == "cuda":
        with torch.cuda.device(device):
            capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            raise RuntimeError(
                "pad_targets: the counts come from the host, and a CUDA graph would replay their copy from a "
                "host buffer freed by then; pad the targets before the capture and copy them into the tensors "
                "the graph reads"
            )
    label_dtype = labels[0].dtype
    n = len(boxes)
    gt_boxes = torch.zeros((n, t, 4), dtype=torch.float32, device=device)
    gt_labels = torch.zeros((n, t), dtype=label_dtype, device=device)
    host_counts = torch.tensor(counts, dtype=torch.int32)
    if longest > 0:
        # One concatenation and one scatter per output, whatever B is (not a
        # copy per image): the rows image i's boxes go to in the [B * T]
        # view, i * T + 0..n_i, are known on the host.
        column = torch.arange(t)
        rows = (torch.arange(n)[:, None] * t + column)[column < host_counts[:, None]]
        rows = _to_device(rows, device)
        flat_boxes = torch.cat([b.to(device) for b in boxes]).to(torch.float32)
        flat_labels = torch.cat([l.to(device) for l in labels]).to(label_dtype)
        gt_boxes.view(n * t, 4).index_copy_(0, rows, flat_boxes)
        gt_labels.view(n * t).index_copy_(0, rows, flat_labels)
    gt_counts = _to_device(host_counts, device)
    return gt_boxes, gt_labels, gt_counts


def _check(priors, gt_boxes, gt_labels, gt_counts):
    """(P, B, T) of the inputs; a wrong dtype raises TypeError, a wrong shape
    or device ValueError, through ``_check_value`` and ``_check_type`` (which
    fake and symbolic shapes go through too)."""
    _check_value(
        priors.dim() == 2 and priors.shape[-1] == 4,
        lambda: f"assign_targets: priors must be [P, 4], got {tuple(priors.shape)}",
    )
    _check_value(
        gt_boxes.dim() == 3 and gt_boxes.shape[-1] == 4,
        lambda: f"assign_targets: gt_boxes must be [B, T, 4], got {tuple(gt_boxes.shape)}",
    )
    b, t = gt_boxes.shape[0], gt_boxes.shape[1]
    _check_value(
        tuple(gt_labels.shape) == (b, t),
        lambda: f"assign_targets: gt_labels must be [{b}, {t}], got {tuple(gt_labels.shape)}",
    )
    _check_value(
        tuple(gt_counts.shape) == (b,),
        lambda: f"assign_targets: gt_counts must be [{b}], got {tuple(gt_counts.shape)}",
    )
    _check_type(
        gt_labels.dtype in _LABEL_TYPES,
        lambda: f"assign_targets: gt_labels must be int64 or int32, got {gt_labels.dtype}",
    )
    _check_type(
        priors.is_floating_point(), lambda: f"assign_targets: priors must be floating point, got {priors.dtype}"
    )
    _check_type(
        gt_boxes.is_floating_point(),
        lambda: f"assign_targets: gt_boxes must be floating point, got {gt_boxes.dtype}",
    )
    _check_type(
        not gt_counts.is_floating_point() and not gt_counts.is_complex() and gt_counts.dtype != torch.bool,
        lambda: f"assign_targets: gt_counts must be integers, got {gt_counts.dtype}",
    )
    for name, x in (("priors", priors), ("gt_labels", gt_labels), ("gt_counts", gt_counts)):
        _check_value(
            x.device == gt_boxes.device,
            lambda: f"assign_targets: {name} is on {x.device}, gt_boxes on {gt_boxes.device}",
        )
    p = priors.shape[0]
    for value, text in ((p, "P >= 1 priors"), (b, "B >= 1 images"),
                        (t, "T >= 1 box rows (pad an image without boxes to one row with a count of 0)")):
        _check_value(
            value >= 1,
            lambda text=text: f"assign_targets: needs {text}, got priors {tuple(priors.shape)}, "
            f"gt_boxes {tuple(gt_boxes.shape)}",
        )
    return p, b, t


def _counts_i32(gt_counts, t):
    """``gt_counts`` as the int32 the kernels read. A count outside 0..=T is
    clamped by the kernels, which record it in the status word; a wider
    integer is first brought to -1..=T+1 in its own type, so that the
    conversion cannot wrap a count of 2**32 + 1 into a valid 1."""
    if gt_counts.dtype != torch.int32:
        gt_counts = gt_counts.to(torch.int64).clamp(-1, t + 1)
    return gt_counts.to(torch.int32).contiguous()


def _settings(iou_threshold, center_variance, size_variance, num_classes=None):
    """The settings as ``(iou_threshold, center_variance, size_variance,
    num_classes)``: three floats and C as an int, 0 for None (unknown).
    Python's and numpy's real numbers are taken; bool is refused (``float``
    would make True a threshold of 1.0), as are strings and tensors. The
    ranges are the library's (SPEC.md), checked here so that a bad setting
    is a ValueError when it is given (MultiboxLoss's constructor), not a
    MultiboxError at the first assignment: ``iou_threshold`` in (0, 1],
    both variances positive and finite, all three as float32s (a value
    that rounds to 0 or overflows there is refused). ``num_classes`` is
    None or an integer >= 2 (background and one class)."""
    settings = (("iou_threshold", iou_threshold), ("center_variance", center_variance),
                ("size_variance", size_variance))
    for name, value in settings:
        value = _real_setting("assign_targets", name, value)
        # Comparisons only, which NaN fails too (as _check_settings does).
        top, within = (1.0, "in (0, 1]") if name == "iou_threshold" else (_F32_MAX, "positive and finite")
        if not _F32_HALF_TINY < value <= top:
            raise ValueError(f"assign_targets: {name} must be {within} (as a float32), got {value!r}")
    if num_classes is None:
        classes = 0
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"assign_targets: num_classes must be None or an integer, got {num_classes!r}")
    elif not 2 <= num_classes <= 0xFFFFFFFF:
        raise ValueError(
            "assign_targets: num_classes must be at least 2 (background and one class) and below 2**32, "
            f"got {num_classes!r}"
        )
    else:
        classes = int(num_classes)
    return (*(float(value) for _, value in settings), classes)


def _config(iou_threshold, center_variance, size_variance, num_classes):
    return _capi_targets.TargetConfig(
        float(iou_threshold), float(center_variance), float(size_variance), int(num_classes)
    )


def _assigner(device_index, priors_host, iou_threshold, center_variance, size_variance, num_classes):
    key = (device_index, float(iou_threshold), float(center_variance), float(size_variance), int(num_classes))
    handle = _assigners.get(key)
    if handle is None:
        lib = _capi_targets.library()
        config = _config(iou_threshold, center_variance, size_variance, num_classes)
        out = ctypes.c_void_p()
        lib.call(
            "multibox_assigner_create",
            device_index,
            priors_host.data_ptr(),
            priors_host.numel(),
            ctypes.byref(config),
            ctypes.byref(out),
        )
        handle = out.value
        _assigners[key] = handle
    return handle


def _cuda_assign(priors, gt_boxes, gt_labels, gt_counts, thr, cv, sv, num_classes):
    lib = _capi_targets.library()
    device = gt_boxes.device
    p, b, t = priors.shape[0], gt_boxes.shape[0], gt_boxes.shape[1]
    # The caller's priors tensor (not its float32 copy, if any) is what is
    # remembered as checked.
    priors_key, priors_arg = _priors_key(priors), priors
    priors = priors.to(torch.float32).contiguous()
    gt_boxes = gt_boxes.to(torch.float32).contiguous()
    gt_labels = gt_labels.contiguous()
    gt_counts = _counts_i32(gt_counts, t)
    labels = torch.empty((b, p), dtype=gt_labels.dtype, device=device)
    gt_locations = torch.empty((b, p, 4), dtype=torch.float32, device=device)
    # From PyTorch's caching allocator (512-byte aligned blocks; the kernels
    # need 256): the library allocates nothing.
    workspace = torch.empty(_capi_targets.workspace_bytes(b, p, t), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        handle = _assigners.get((device.index, float(thr), float(cv), float(sv), int(num_classes)))
        # The kernels read the priors unchecked, so each priors tensor is
        # checked on the host once (a copy, which waits for the stream):
        # when the assigner is made (outside any graph capture), and for
        # every other priors tensor, or one written since, after that. A
        # graph capture cannot copy to the host: there, priors that no call
        # before the capture saw go unchecked.
        if handle is None:
            _not_during_capture("assign_targets")
            handle = _assigner(device.index, priors.cpu(), thr, cv, sv, num_classes)
            _priors_seen(priors_key, priors_arg)
        elif not _priors_checked(priors_key, priors_arg) and not torch.cuda.is_current_stream_capturing():
            _check_priors_on_host(priors.cpu())
            _priors_seen(priors_key, priors_arg)
        call = _capi_targets.TargetCall(
            shape=_capi_targets.TargetShape(b, p, t),
            dtype=_capi.F32,
            label_type=_LABEL_TYPES[gt_labels.dtype],
            priors=priors.data_ptr(),
            gt_boxes=gt_boxes.data_ptr(),
            gt_labels=gt_labels.data_ptr(),
            gt_counts=gt_counts.data_ptr(),
            labels=labels.data_ptr(),
            gt_locations=gt_locations.data_ptr(),
            workspace=workspace.data_ptr(),
            workspace_bytes=workspace.numel(),
        )
        stream = torch.cuda.current_stream(device).cuda_stream
        lib.call("multibox_assign_targets", handle, ctypes.byref(call), ctypes.c_void_p(stream))
    # The workspace holds the status word (last_assign_status reads it).
    return labels, gt_locations, workspace


def _priors_key(priors):
    return (priors.device, priors.data_ptr(), tuple(priors.shape), priors.stride(), priors.dtype)


def _priors_checked(key, priors):
    """Whether ``priors`` (at ``key``) were checked and not written since."""
    entry = _checked_priors.get(key)
    return entry is not None and entry[0]() is not None and entry[1] == priors._version


def _priors_seen(key, priors):
    """Records ``priors`` as checked; the entry goes with the tensor."""

    def forget(_ref, key=key):
        entry = _checked_priors.get(key)
        if entry is not None and entry[0] is _ref:
            del _checked_priors[key]

    _checked_priors[key] = (weakref.ref(priors, forget), priors._version)


def _check_priors_on_host(priors_host):
    """Checks host priors ``[P, 4]`` as the crate does (finite, w and h
    positive), raising its MultiboxError: an assignment of one empty image
    by the CPU reference, which checks the priors before anything else."""
    priors_host = priors_host.to(torch.float32).contiguous()
    gt_boxes = torch.zeros((1, 1, 4), dtype=torch.float32)
    gt_labels = torch.zeros((1, 1), dtype=torch.int32)
    gt_counts = torch.zeros((1,), dtype=torch.int32)
    _cpu_assign(priors_host, gt_boxes, gt_labels, gt_counts, 0.5, 0.1, 0.2, 0)


def _cpu_assign(priors, gt_boxes, gt_labels, gt_counts, thr, cv, sv, num_classes):
    lib = _capi_targets.library()
    p, b, t = priors.shape[0], gt_boxes.shape[0], gt_boxes.shape[1]
    priors = priors.to(torch.float32).contiguous()
    gt_boxes = gt_boxes.to(torch.float32).contiguous()
    gt_labels = gt_labels.contiguous()
    gt_counts = _counts_i32(gt_counts, t)
    labels = torch.empty((b, p), dtype=gt_labels.dtype)
    gt_locations = torch.empty((b, p, 4), dtype=torch.float32)
    call = _capi_targets.TargetHostCall(
        shape=_capi_targets.TargetShape(b, p, t),
        label_type=_LABEL_TYPES[gt_labels.dtype],
        priors=priors.data_ptr(),
        priors_len=priors.numel(),
        gt_boxes=gt_boxes.data_ptr(),
        gt_boxes_len=gt_boxes.numel(),
        gt_labels=gt_labels.data_ptr(),
        gt_labels_len=gt_labels.numel(),
        gt_counts=gt_counts.data_ptr(),
        gt_counts_len=gt_counts.numel(),
        labels=labels.data_ptr(),
        labels_len=labels.numel(),
        gt_locations=gt_locations.data_ptr(),
        gt_locations_len=gt_locations.numel(),
    )
    config = _config(thr, cv, sv, num_classes)
    status = _capi_targets.TargetStatus()
    lib.call("multibox_reference_assign_targets", ctypes.byref(config), ctypes.byref(call), ctypes.byref(status))
    # The CPU's stand-in for the workspace: the status, one byte a flag.
    flags = [status.count_clamped, status.invalid_box_label, status.degenerate_box]
    return labels, gt_locations, torch.tensor(flags, dtype=torch.uint8)


@torch.library.custom_op("multibox::assign_targets", mutates_args=())
def _assign_op(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_counts: Tensor,
    iou_threshold: float,
    center_variance: float,
    size_variance: float,
    num_classes: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(labels [B, P], gt_locations [B, P, 4] float32, status): ``status`` is
    the uint8 workspace on CUDA, whose status word ``_assign_status`` reads;
    on the CPU the reference's status itself, three bytes (count_clamped,
    invalid_box_label, degenerate_box). ``num_classes`` is C, or 0 when
    unknown."""
    _check(priors, gt_boxes, gt_labels, gt_counts)
    args = (priors, gt_boxes, gt_labels, gt_counts, iou_threshold, center_variance, size_variance, num_classes)
    if gt_boxes.is_cuda:
        return _cuda_assign(*args)
    _check_value(
        gt_boxes.device.type == "cpu", lambda: f"assign_targets runs on CUDA and CPU tensors, got {gt_boxes.device}"
    )
    return _cpu_assign(*args)


@_assign_op.register_fake
def _(priors, gt_boxes, gt_labels, gt_counts, iou_threshold, center_variance, size_variance, num_classes=0):
    p, b, t = _check(priors, gt_boxes, gt_labels, gt_counts)
    labels = gt_labels.new_empty((b, p))
    gt_locations = gt_boxes.new_empty((b, p, 4), dtype=torch.float32)
    if not gt_boxes.is_cuda:
        size = 3
    elif all(isinstance(n, int) for n in (b, p, t)):
        size = _capi_targets.workspace_bytes(b, p, t)
    else:
        # Symbolic shapes: the workspace's layout is the crate's business.
        size = torch.library.get_ctx().new_dynamic_size()
    status = gt_boxes.new_empty((size,), dtype=torch.uint8)
    return labels, gt_locations, status


def _assign_setup_context(ctx, inputs, output):
    # The targets are constants of the loss, as SPEC.md says (no gradient
    # reaches gt_locations): boxes that require grad, say from an
    # augmentation written in PyTorch, must not make the loss's backward
    # try to go through the assignment.
    ctx.mark_non_differentiable(*output)


def _assign_backward(ctx, *grads):
    # Not called (no output is differentiable); no input gets a gradient.
    return (None,) * 8


_assign_op.register_autograd(_assign_backward, setup_context=_assign_setup_context)


def _assign_status(record):
    """The ``TargetStatus`` of the assignment ``record`` (``(status, shape,
    settings)`` from ``MultiboxLoss.assign``) describes: on CUDA the status
    word in its workspace, read once the device has finished its work; on
    the CPU the reference's, kept as it is."""
    status, shape, settings = record
    if status.device.type == "meta":
        raise RuntimeError("last_assign_status(): the last assignment ran on meta tensors, which hold no values")
    if not status.is_cuda:
        return TargetStatus(*(bool(v) for v in status.tolist()))
    device = status.device
    lib = _capi_targets.library()
    out = _capi_targets.TargetStatus()
    with torch.cuda.device(device):
        _wait_for_status("MultiboxLoss.last_assign_status()", device)
        handle = _assigners[(device.index, *settings)]
        stream = torch.cuda.current_stream(device).cuda_stream
        lib.call(
            "multibox_assigner_status", handle, ctypes.byref(_capi_targets.TargetShape(*shape)),
            status.data_ptr(), status.numel(), ctypes.c_void_p(stream), ctypes.byref(out),
        )
    return TargetStatus(bool(out.count_clamped), bool(out.invalid_box_label), bool(out.degenerate_box))


def assign_targets(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_counts: Tensor,
    iou_threshold: float = 0.5,
    center_variance: float = 0.1,
    size_variance: float = 0.2,
    *,
    num_classes: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """The reference's ``MatchPrior`` for a padded batch: ``(labels,
    gt_locations)`` ready for the loss.

    priors ``[P, 4]`` center form; gt_boxes ``[B, T, 4]`` corner form
    (relative to the image); gt_labels ``[B, T]`` (int64 or int32, classes
    1..C-1); gt_counts ``[B]``: image b's boxes are rows ``0..gt_counts[b]``,
    the rest is padding and never read (see ``pad_targets``). All on one
    device. Returns labels ``[B, P]`` (gt_labels' type; 0 background) and
    gt_locations ``[B, P, 4]`` float32 (every prior's best box, encoded).

    ``num_classes`` (keyword-only): C, the classes of the loss that follows
    (background included), an integer >= 2, or None (the default) when
    unknown. When given, a box label ``>= C`` is recorded as an invalid box
    label too (its priors keep that label, which the loss then refuses);
    box labels below 1 are recorded either way.

    An image with no box gets labels 0 and offsets 0. Settings out of range
    (threshold outside (0, 1], variances <= 0, num_classes below 2) raise;
    on the GPU, bad counts (clamped), invalid box labels and degenerate
    boxes (skipped) are recorded in the device status word instead, as
    SPEC.md says; on the CPU they are handled the same way.
    ``MultiboxLoss.assign`` keeps the status of its last assignment for
    ``last_assign_status()``.

    On CUDA the kernels read the priors unchecked, so each priors tensor is
    copied to the host and checked (finite, positive sizes) the first time
    it is used and after it was written in place: pass one priors tensor,
    made once, rather than a new copy each call.
    """
    _check_tensors("assign_targets", priors=priors, gt_boxes=gt_boxes, gt_labels=gt_labels, gt_counts=gt_counts)
    settings = _settings(iou_threshold, center_variance, size_variance, num_classes)
    labels, gt_locations, _ = _assign_op(priors, gt_boxes, gt_labels, gt_counts, *settings)
    return labels, gt_locations


class MultiboxLoss(nn.Module):
    """The reference training code's ``MultiboxLoss``, on the crate's kernels.

    Same constructor, same ``forward(confidence, predicted_locations, labels,
    gt_locations) -> (regression_loss, classification_loss)``: a training
    script switches by changing one import. Differences, from SPEC.md: a
    batch with no positive gives 0 losses (the reference divides by 0),
    ties among hard-negative candidates go to the lower prior index, and a
    fractional ``neg_pos_ratio * pos`` is rounded down (floor: ratio 2.5
    with 3 positives mines 7 negatives, the reference 8).

    Three keyword-only settings beyond the reference's (``multibox_loss``
    documents the first two, ``assign_targets`` the third):

    - ``normalizer``: what the losses are divided by; ``None`` or
      ``"positives"`` (the reference's N, the default), ``"per_image"``
      (NVIDIA's SSD recipe), a number, or a one-element tensor holding the
      divisor (on the inputs' device, which each ``forward`` checks).
      ``forward(..., normalizer=n)`` overrides it for one call: that is where a
      step's all-reduced positive count goes (a one-element tensor on the
      inputs' device), see README, "Data-parallel training". A tensor given
      here is moved to ``device`` (a copy, if it was elsewhere) and kept as
      a non-persistent buffer: ``.to()`` and ``.cuda()`` move it,
      ``state_dict()`` leaves it out and ``.half()`` keeps its dtype. A
      divisor that changes from step to step belongs in such a tensor, not
      in a Python number: under torch.compile each new number compiles the
      step again.
    - ``layout``: ``"row_major"`` (``[B, P, C]`` logits, ``[B, P, 4]``
      boxes; the default) or ``"channel_major"`` (``[B, C, P]``, ``[B, 4, P]``:
      heads concatenated without a transpose). A property of the model, so
      set here only.
    - ``num_classes``: C, for ``assign``: None (the default, unknown) or an
      integer >= 2; with it a box label ``>= C`` is recorded as an invalid
      box label (``last_assign_status()``), as one below 1 always is.

    ``assign(gt_boxes, gt_labels, gt_counts)`` makes ``labels`` and
    ``gt_locations`` from padded boxes with the stored priors and settings
    (lists of per-image tensors are padded first), on the boxes' device.
    With ``layout="channel_major"`` its ``gt_locations`` is a ``[B, 4, P]``
    view of the ``[B, P, 4]`` offsets the assignment writes: the loss's
    forward and backward each copy it into contiguous memory of the logits'
    dtype (one copy, the one that half-precision logits need for the float32
    targets anyway), so that nothing but the caller's tensors and the
    workspace is kept between the two.

    Bad inputs that only the device sees do not stop a step: an invalid
    label (both losses NaN) or a non-finite input in the loss, a clamped
    count, an invalid box label (below 1, or ``>= num_classes`` when that
    is given) or a degenerate box in the assignment are
    recorded in a status word on the device. ``last_status()`` (a
    ``LossStatus``) and ``last_assign_status()`` (a ``TargetStatus``) read
    the last ``forward``'s and ``assign``'s: one explicit call that waits
    for the device (every stream, so a step on a side stream is seen too;
    refused inside a CUDA graph capture, which a wait would break), made
    when the caller chooses (every N steps, or when a loss turns NaN); the
    steps themselves never synchronise. The
    module keeps the last call's workspace for this (a few bytes per prior),
    so the calls allocate nothing more. On the CPU, where the reference
    raises MultiboxError on an invalid label (so ``invalid_label`` is always
    False), ``last_status()`` checks the last forward's inputs, which the
    module keeps until the next forward; ``last_assign_status()`` returns
    the reference's status.
    """

    def __init__(self, priors, iou_threshold, neg_pos_ratio, center_variance, size_variance, device, *,
                 normalizer=None, layout: str = "row_major", num_classes: Optional[int] = None):
        super().__init__()
        from . import _check_layout, _check_settings

        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.center_variance = center_variance
        self.size_variance = size_variance
        self.priors = priors.to(device)
        # assign()'s copies of the priors on other devices (see _priors_on).
        self._priors_copies = {}
        # Refused here rather than at the first step.
        _settings(iou_threshold, center_variance, size_variance, num_classes)
        _check_settings(neg_pos_ratio, 0, 1.0)
        _check_layout(layout)
        # Checked by the property's setter; a tensor goes to `device`, as
        # the priors do.
        self.normalizer = normalizer.to(device) if isinstance(normalizer, Tensor) else normalizer
        self.layout = layout
        self.num_classes = num_classes
        # What last_status() and last_assign_status() read.
        self._last_loss = None
        self._last_assign = None

    @property
    def normalizer(self):
        """The module's divisor setting (``multibox_loss``'s ``normalizer``).
        A tensor is kept as a non-persistent buffer: ``.to(device)`` and
        ``.cuda()`` move it with the module, ``state_dict()`` leaves it out
        (it is a setting, not a learned value), and it keeps its dtype
        through ``.half()`` and ``.double()`` (see ``_apply``)."""
        tensor = self._buffers.get("_normalizer_tensor")
        return tensor if tensor is not None else self._normalizer_setting

    @normalizer.setter
    def normalizer(self, normalizer):
        from . import _check_normalizer

        _check_normalizer(normalizer)
        is_tensor = isinstance(normalizer, Tensor)
        self.register_buffer("_normalizer_tensor", normalizer if is_tensor else None, persistent=False)
        self._normalizer_setting = None if is_tensor else normalizer

    def _apply(self, fn, recurse=True):
        # nn.Module's conversions (.half(), .double(), .to(dtype)) convert
        # floating buffers; the normaliser tensor follows the device only.
        # The op converts it to float32 anyway, and a float16 divisor would
        # have rounded it first (4097 to 4096; 70000 to infinity).
        before = self._buffers.get("_normalizer_tensor")
        super()._apply(fn, recurse)
        after = self._buffers.get("_normalizer_tensor")
        if before is not None and after is not None and after.dtype != before.dtype:
            self._buffers["_normalizer_tensor"] = before.to(after.device)
        return self

    def extra_repr(self):
        normalizer = self.normalizer
        if isinstance(normalizer, Tensor):
            # Its metadata only: printing a CUDA tensor's value would copy it.
            normalizer = (
                f"tensor(shape={tuple(normalizer.shape)}, dtype={normalizer.dtype}, device={normalizer.device})"
            )
        else:
            normalizer = repr(normalizer)
        return (
            f"priors={tuple(self.priors.shape)}, iou_threshold={self.iou_threshold!r}, "
            f"neg_pos_ratio={self.neg_pos_ratio!r}, center_variance={self.center_variance!r}, "
            f"size_variance={self.size_variance!r}, normalizer={normalizer}, layout={self.layout!r}, "
            f"num_classes={self.num_classes!r}"
        )

    def forward(self, confidence: Tensor, predicted_locations: Tensor, labels: Tensor, gt_locations: Tensor,
                normalizer=None):
        """``(regression_loss, classification_loss)``; ``normalizer`` (not
        None) replaces the module's for this call."""
        regression_loss, classification_loss, _, record = _loss_and_record(
            confidence,
            predicted_locations,
            labels,
            gt_locations,
            self.neg_pos_ratio,
            0,
            1.0,
            self.normalizer if normalizer is None else normalizer,
            self.layout,
        )
        self._last_loss = record
        return regression_loss, classification_loss

    @torch.compiler.disable
    def last_status(self):
        """The ``LossStatus`` (invalid_label, nonfinite_input) of the last
        ``forward``: on CUDA its device status word, read once the device
        has finished its work (every stream). See the class's
        documentation."""
        from . import _loss_status

        if self._last_loss is None:
            raise RuntimeError("MultiboxLoss.last_status(): the module has not computed a loss yet")
        return _loss_status(self._last_loss)

    @torch.compiler.disable
    def last_assign_status(self) -> TargetStatus:
        """The ``TargetStatus`` (count_clamped, invalid_box_label,
        degenerate_box) of the last ``assign``: on CUDA its device status
        word, read as ``last_status`` reads the loss's."""
        if self._last_assign is None:
            raise RuntimeError("MultiboxLoss.last_assign_status(): the module has not assigned targets yet")
        return _assign_status(self._last_assign)

    def _priors_on(self, device):
        """``self.priors`` on ``device``: the tensor itself, or a copy made
        once per device and kept until ``self.priors`` is replaced or written.
        A copy each call would be a new priors tensor each step, which on
        CUDA is checked on the host again (a synchronisation) and could not
        be made inside a graph capture. ``priors`` is an attribute, not a
        buffer, as in the reference, so that ``.half()`` leaves it float32;
        ``.cuda()`` therefore does not move it, and this is what serves a
        module made with ``device="cpu"`` whose boxes are on the GPU."""
        priors = self.priors
        if priors.device == device:
            return priors
        kept = self._priors_copies.get(device)
        if kept is None or kept[0] is not priors or kept[1] != priors._version:
            kept = (priors, priors._version, priors.to(device))
            self._priors_copies[device] = kept
        return kept[2]

    def assign(self, gt_boxes, gt_labels, gt_counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(labels, gt_locations)`` for a padded batch (``gt_counts`` given)
        or for lists of per-image boxes and labels (``gt_counts`` None);
        gt_locations in the module's layout."""
        if gt_counts is None:
            if isinstance(gt_boxes, Tensor):
                raise ValueError("gt_counts is required with padded gt_boxes; pass lists to have them padded")
            gt_boxes, gt_labels, gt_counts = pad_targets(list(gt_boxes), list(gt_labels))
        priors = self._priors_on(gt_boxes.device)
        settings = _settings(self.iou_threshold, self.center_variance, self.size_variance, self.num_classes)
        labels, gt_locations, status = _assign_op(priors, gt_boxes, gt_labels, gt_counts, *settings)
        self._last_assign = (status, (gt_boxes.shape[0], priors.shape[0], gt_boxes.shape[1]), settings)
        if self.layout == "channel_major":
            gt_locations = gt_locations.transpose(1, 2)
        return labels, gt_locations
