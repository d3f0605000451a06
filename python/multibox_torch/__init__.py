"""The SSD MultiBox loss of the `multibox` crate as a PyTorch custom op.

    import multibox_torch
    reg, cls, num_pos = multibox_torch.multibox_loss(
        confidence, predicted_locations, labels, gt_locations, neg_pos_ratio=3.0)
    (reg + cls).backward()

CUDA tensors (f32, f16 or bf16; i64 or i32 labels) run the crate's fused
kernels on the current stream, with the workspace from PyTorch's caching
allocator: no host synchronisation, so the call can be captured in a CUDA
graph and traced by torch.compile (the ops have fake implementations). CPU
tensors (f32) run the crate's CPU reference, the same semantics in f64.

The forward (``multibox::forward``: kernels 1 and 2) computes the losses and
keeps the mining decisions in a small workspace (12 bytes per prior and
a few per image); the backward (``multibox::backward``: kernel 3) reads
them with autograd's upstream gradients from device memory, so each gradient
is rounded once and no ``[B, P, C]`` tensor lives between the two.

``normalizer=`` chooses the divisor (the batch's positives, each image's
own as NVIDIA's SSD, or a given n: a number, or a one-element tensor the
kernels read on the device, such as a positive count all-reduced across
data-parallel ranks); ``layout="channel_major"`` takes ``[B, C, P]`` logits
and ``[B, 4, P]`` boxes. See ``multibox_loss`` and docs/SPEC.md. A divisor
that changes every step belongs in a tensor: torch.compile makes each
Python number (the normaliser, neg_pos_ratio, beta) a constant of the graph
and compiles again for each new value.

Invalid labels and non-finite inputs do not stop the kernels; they are
recorded in a status word on the device, which ``MultiboxLoss.last_status()``
reads when asked (one explicit call, which synchronises).

``pip install ./python`` bundles the library in this package;
``$MULTIBOX_LIB`` overrides it (see ``_capi.find_library``).
"""

import math
import numbers
import operator
from typing import NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _capi

# Whether a tensor is a torch.func.grad (vjp, jacrev) wrapper; None where
# this PyTorch lacks the (private) query, and the check is left out.
_is_grad_tracking = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", None)

__all__ = ["multibox_loss", "library_path", "MultiboxError", "LossStatus", "__version__"]

MultiboxError = _capi.MultiboxError

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("multibox-torch")
except PackageNotFoundError:  # a source checkout used without installing
    __version__ = "0+unknown"

_DTYPES = {torch.float32: _capi.F32, torch.float16: _capi.F16, torch.bfloat16: _capi.BF16}
_LABEL_TYPES = {torch.int32: _capi.I32, torch.int64: _capi.I64}
_F32_MAX = 3.4028234663852886e38
_F32_HALF_TINY = 2.0**-150
_LAYOUTS = {"row_major": _capi.ROW_MAJOR, "channel_major": _capi.CHANNEL_MAJOR}
_NORMALIZERS = {"positives": _capi.NORMALIZE_POSITIVES, "per_image": _capi.NORMALIZE_PER_IMAGE}

# (device index, neg_pos_ratio, min_negatives_per_image, beta) -> multibox_loss*
# A loss loads the kernels once per device and configuration; it lives as
# long as the process. Not bounded: multibox_loss_destroy requires that no
# work queued through the loss is still to be launched, and a CUDA graph
# captured with its kernels (torch.cuda.graph, torch.compile's
# "reduce-overhead") may replay them at any time, so no handle is ever
# known to be free. A run uses a handful of configurations; a schedule that
# gives neg_pos_ratio or beta a new value each step would load the kernels
# each step (see multibox_loss).
_losses = {}


class LossStatus(NamedTuple):
    """What the loss's kernels saw that only the device can see
    (``MultiboxLoss.last_status()``; the C ABI's ``multibox_device_status``)."""

    #: A label outside ``-1..C-1``: both losses of that call are NaN.
    invalid_label: bool
    #: A NaN or infinity among the logits (ignored priors' too) or a
    #: positive's box offsets (predicted minus target).
    nonfinite_input: bool


def library_path():
    """The path of the multibox library this package loads."""
    return _capi.library().path


def _not_during_capture(what):
    """Raises a clear error where a first call would load kernels (or read
    the priors back) inside a CUDA graph capture, which the driver refuses
    with an unclear one: such a call belongs to the warm-up run that
    ``torch.cuda.graph`` asks for anyway. It sees this thread's capture
    only: a capture in global mode on another thread is broken by the
    load all the same."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what}: the first call on a device with these settings loads the kernels, which cannot "
            "happen while a CUDA graph is being captured; run the step once before the capture (a warm-up)"
        )


def _wait_for_status(what, device):
    """Waits for every stream of ``device`` before a status read, so that
    the read sees the step whichever stream it ran on (a side stream's,
    say, read from the default one); an occasional call, so the device-wide
    wait costs nothing that matters. Inside a CUDA graph capture of this
    thread the driver would refuse the wait and invalidate the caller's
    capture: a clear error instead."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what}: reading the status waits for the device, which cannot happen while a CUDA graph is "
            "being captured (the capture would break); read it after the capture, or after a replay"
        )
    torch.cuda.synchronize(device)


def _loss_handle(device_index, neg_pos_ratio, min_negatives_per_image, beta):
    key = (device_index, float(neg_pos_ratio), int(min_negatives_per_image), float(beta))
    handle = _losses.get(key)
    if handle is None:
        _not_during_capture("multibox_loss")
        lib = _capi.library()
        config = lib.config(neg_pos_ratio, min_negatives_per_image, beta)
        out = _capi.ctypes.c_void_p()
        lib.call("multibox_loss_create", device_index, _capi.ctypes.byref(config), _capi.ctypes.byref(out))
        handle = out.value
        _losses[key] = handle
    return handle


def _real_setting(function, name, value):
    """A float setting as a Python int or float, ready for range checks by
    comparison: numbers.Real takes numpy's scalars too (a config read with
    numpy), which become floats (numpy's float16 would overflow comparing
    with _F32_MAX); bool is refused, though Python counts it an int, as are
    strings and tensors (a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}: {name} must be a real number, got {value!r}")
    return value if isinstance(value, (int, float)) else float(value)


def _check_settings(neg_pos_ratio, min_negatives_per_image, beta):
    """The settings as the C ABI takes them, checked before they reach ctypes
    (whose uint32 would wrap -1 to 4294967295 and 2**32 to 0, and whose
    float would turn 1e39 into infinity and 1e-46 into 0)."""
    for name, value in (("neg_pos_ratio", neg_pos_ratio), ("beta", beta)):
        value = _real_setting("multibox_loss", name, value)
        # Comparisons only, which reject NaN and infinity too: torch.compile
        # traces them on a symbolic float, where math.isfinite fails.
        if not 0 < value <= _F32_MAX:
            raise ValueError(f"multibox_loss: {name} must be positive and finite (as a float32), got {value!r}")
        # The C ABI takes a float32, in which a positive value this small
        # is 0, which the library refuses (see _check_normalizer).
        if value <= _F32_HALF_TINY:
            raise ValueError(f"multibox_loss: {name} {value!r} rounds to 0 in float32")
    if isinstance(min_negatives_per_image, bool):
        raise TypeError(f"multibox_loss: min_negatives_per_image must be an integer, got {min_negatives_per_image!r}")
    try:
        min_neg = operator.index(min_negatives_per_image)
    except TypeError:
        raise TypeError(
            f"multibox_loss: min_negatives_per_image must be an integer, got {min_negatives_per_image!r}"
        ) from None
    if not 0 <= min_neg < 2**32:
        raise ValueError(f"multibox_loss: min_negatives_per_image must be in 0..2**32-1, got {min_neg}")
    return float(neg_pos_ratio), min_neg, float(beta)


def _check_layout(layout):
    """The ``layout=`` argument as a ``multibox_layout``."""
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        raise ValueError(f"multibox_loss: layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    return _LAYOUTS[layout]


def _check_normalizer(normalizer, device=None):
    """The ``normalizer=`` argument as ``(kind, value, tensor)``: a
    ``multibox_normalizer``, Given's n from the host (else 0) and the
    one-element tensor holding n (else None), which must be on ``device``
    when that is given. Plain Python on the tensor's metadata, so that
    torch.compile folds it away."""
    if normalizer is None:
        return _capi.NORMALIZE_POSITIVES, 0.0, None
    if isinstance(normalizer, str):
        if normalizer not in _NORMALIZERS:
            raise ValueError(
                f"multibox_loss: normalizer must be None, 'positives', 'per_image', a number or a one-element "
                f"tensor, got the string {normalizer!r}"
            )
        return _NORMALIZERS[normalizer], 0.0, None
    if isinstance(normalizer, Tensor):
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"multibox_loss: a normalizer tensor must be real numbers, got {normalizer.dtype}")
        if normalizer.numel() != 1:
            raise ValueError(
                f"multibox_loss: a normalizer tensor must hold one element (the divisor), got shape "
                f"{tuple(normalizer.shape)}"
            )
        if device is not None and normalizer.device != device:
            raise ValueError(
                f"multibox_loss: the normalizer tensor is on {normalizer.device}, the loss's inputs on {device}: "
                f"move it with .to({str(device)!r}) (on CUDA the kernels read it there, with no host "
                "synchronisation)"
            )
        return _capi.NORMALIZE_GIVEN, 0.0, normalizer
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(
            f"multibox_loss: normalizer must be None, 'positives', 'per_image', a number or a one-element "
            f"tensor, got {normalizer!r}"
        )
    try:
        value = float(normalizer)
    except OverflowError:
        # An integer (or a Fraction) beyond even a float64's range; its
        # repr may run to hundreds of digits.
        text = repr(normalizer)
        if len(text) > 32:
            text = f"{text[:16]}... ({len(text)} characters)"
        raise ValueError(f"multibox_loss: normalizer {text} is out of float32's range") from None
    # A comparison, not math.isfinite (see _check_settings): finite values
    # beyond float32 are refused; infinity and NaN pass (NaN losses).
    if _F32_MAX < abs(value) < math.inf:
        raise ValueError(f"multibox_loss: normalizer {value!r} is out of float32's range")
    # The divisor is a float32: a tiny n would become 0, which means "no
    # positives" (zero losses), not a division by n. A comparison again:
    # 2**-150, half the smallest subnormal, is the largest value that
    # rounds (to even) to 0.
    if value != 0.0 and abs(value) <= _F32_HALF_TINY:
        raise ValueError(f"multibox_loss: normalizer {value!r} rounds to 0 in float32")
    return _capi.NORMALIZE_GIVEN, value, None


def _check_normalizer_tensor(normalizer_tensor, device):
    if normalizer_tensor is None:
        return
    _check_value(
        normalizer_tensor.numel() == 1,
        lambda: f"multibox_loss: the normalizer tensor must hold one element, got shape "
        f"{tuple(normalizer_tensor.shape)}",
    )
    _check_type(
        normalizer_tensor.dtype != torch.bool and not normalizer_tensor.is_complex(),
        lambda: f"multibox_loss: the normalizer tensor must be real numbers, got {normalizer_tensor.dtype}",
    )
    _check_value(
        normalizer_tensor.device == device,
        lambda: f"multibox_loss: the normalizer tensor is on {normalizer_tensor.device}, the loss's inputs on "
        f"{device}: move it with .to({str(device)!r}) (on CUDA the kernels read it there, with no host "
        "synchronisation)",
    )


def _check_with(error, cond, message):
    """``torch._check_with``: raise ``error(message())`` unless ``cond``,
    where ``cond`` may be a SymBool (fake tensors with dynamic shapes under
    torch.compile), which torch records as an assumption instead of
    specialising on it. A plain bool, as every check in eager mode is, is
    tested here: the same error, at about a fifth of the cost of torch's
    check (some thirty checks a training step)."""
    if cond is True:
        return
    if cond is False:
        raise error(message())
    torch._check_with(error, cond, message)


def _check_value(cond, message):
    """``torch._check_value`` (a ValueError), as ``_check_with``."""
    _check_with(ValueError, cond, message)


def _check_type(cond, message):
    """``torch._check_type`` (a TypeError), as ``_check_with``."""
    _check_with(TypeError, cond, message)


def _check_tensors(function, **tensors):
    """A TypeError naming the argument that is not a Tensor (a list, a numpy
    array), before anything reads a tensor's attributes."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{function}: {name} must be a Tensor, got {type(value).__name__}")


def _check(confidence, predicted_locations, labels, gt_locations, layout=_capi.ROW_MAJOR):
    """(B, P, C) of the inputs in ``layout`` (a ``multibox_layout``); shapes,
    dtypes and devices checked: a wrong dtype raises TypeError, a wrong
    shape, device or layout ValueError (as the settings' checks do), through
    ``_check_value`` and ``_check_type``, which fake and symbolic shapes go
    through too."""
    _check_value(
        layout in (_capi.ROW_MAJOR, _capi.CHANNEL_MAJOR), lambda: f"multibox_loss: bad layout {layout}"
    )
    if layout == _capi.ROW_MAJOR:
        _check_value(
            confidence.dim() == 3,
            lambda: f"multibox_loss: confidence must be [B, P, C], got {tuple(confidence.shape)}",
        )
        b, p, c = confidence.shape
        loc_shape, loc_text = (b, p, 4), lambda: f"[{b}, {p}, 4]"
    else:
        _check_value(
            confidence.dim() == 3,
            lambda: f"multibox_loss: confidence must be [B, C, P] (layout='channel_major'), got "
            f"{tuple(confidence.shape)}",
        )
        b, c, p = confidence.shape
        loc_shape, loc_text = (b, 4, p), lambda: f"[{b}, 4, {p}] (layout='channel_major')"
    # The library's smallest shape (SPEC.md), refused here as the other
    # shape errors are (a ValueError), and by the fake implementations too.
    for value, least, text in ((b, 1, "B >= 1 images"), (p, 1, "P >= 1 priors"),
                               (c, 2, "C >= 2 classes (background and one)")):
        _check_value(
            value >= least,
            lambda text=text: f"multibox_loss: needs {text}, got confidence {tuple(confidence.shape)}",
        )
    _check_value(
        tuple(predicted_locations.shape) == loc_shape,
        lambda: f"multibox_loss: predicted_locations must be {loc_text()}, got {tuple(predicted_locations.shape)}",
    )
    _check_value(
        tuple(labels.shape) == (b, p),
        lambda: f"multibox_loss: labels must be [{b}, {p}], got {tuple(labels.shape)}",
    )
    _check_value(
        tuple(gt_locations.shape) == loc_shape,
        lambda: f"multibox_loss: gt_locations must be {loc_text()}, got {tuple(gt_locations.shape)}",
    )
    devices = [t.device for t in (confidence, predicted_locations, labels, gt_locations)]
    _check_value(
        all(d == devices[0] for d in devices),
        lambda: "multibox_loss: confidence, predicted_locations, labels and gt_locations must be on one device, "
        "got " + ", ".join(str(d) for d in devices),
    )
    # Meta tensors reach only the fake implementations (the dispatcher
    # runs them for the meta device): shape inference, with any dtype the
    # kernels take.
    _check_value(
        devices[0].type in ("cuda", "cpu", "meta"),
        lambda: f"multibox_loss runs on CUDA and CPU tensors (and meta ones, for their shapes), got {devices[0]}",
    )
    # The CPU's own check first: there f16 and bf16 are refused too, and
    # the CUDA kernels' list of dtypes would mislead.
    if devices[0].type == "cpu":
        _check_type(
            confidence.dtype == torch.float32,
            lambda: f"multibox_loss: on the CPU (the crate's reference) only float32 is supported, got "
            f"{confidence.dtype}; under torch.autocast the inputs are cast to float32 for you",
        )
    _check_type(
        confidence.dtype in _DTYPES,
        lambda: f"multibox_loss: confidence must be f32, f16 or bf16, got {confidence.dtype}",
    )
    _check_type(
        predicted_locations.dtype == confidence.dtype,
        lambda: f"multibox_loss: predicted_locations is {predicted_locations.dtype}, confidence "
        f"{confidence.dtype}: they must match",
    )
    _check_type(
        labels.dtype in _LABEL_TYPES, lambda: f"multibox_loss: labels must be int64 or int32, got {labels.dtype}"
    )
    _check_type(
        gt_locations.dtype.is_floating_point,
        lambda: f"multibox_loss: gt_locations must be a floating-point tensor (it is converted to confidence's "
        f"dtype), got {gt_locations.dtype}",
    )
    return b, p, c


def _contiguous(confidence, predicted_locations, labels, gt_locations):
    """The arrays as the C ABI reads them: contiguous, gt in confidence's
    dtype. A copy only where the input is not so already; the copies are
    temporaries, never saved for the backward."""
    return (
        confidence.contiguous(),
        predicted_locations.contiguous(),
        labels.contiguous(),
        _in_dtype_contiguous(gt_locations, confidence.dtype),
    )


def _in_dtype_contiguous(t, dtype):
    """``t`` in ``dtype`` and contiguous, with one copy at most (converting
    and compacting together; ``to`` alone returns a same-dtype view as it is)."""
    if t.dtype != dtype:
        return t.to(dtype, memory_format=torch.contiguous_format)
    return t.contiguous()


def _device_call(
    b, p, c, confidence, predicted_locations, labels, gt_locations, workspace,
    layout=_capi.ROW_MAJOR, normalizer=_capi.NORMALIZE_POSITIVES, normalizer_value=0.0, normalizer_device=0,
    **outputs,
):
    return _capi.Call(
        shape=_capi.Shape(b, p, c),
        dtype=_DTYPES[confidence.dtype],
        label_type=_LABEL_TYPES[labels.dtype],
        confidence=confidence.data_ptr(),
        predicted_locations=predicted_locations.data_ptr(),
        labels=labels.data_ptr(),
        gt_locations=gt_locations.data_ptr(),
        grad_confidence=outputs.get("grad_confidence", 0),
        grad_locations=outputs.get("grad_locations", 0),
        regression_loss=outputs.get("regression_loss", 0),
        classification_loss=outputs.get("classification_loss", 0),
        num_pos=outputs.get("num_pos", 0),
        mask=0,
        workspace=workspace.data_ptr(),
        workspace_bytes=workspace.numel(),
        upstream=outputs.get("upstream", 0),
        g_reg=1.0,
        g_cls=1.0,
        layout=layout,
        normalizer=normalizer,
        normalizer_value=normalizer_value,
        normalizer_device=normalizer_device,
    )


def _launch(name, device, settings, call):
    lib = _capi.library()
    with torch.cuda.device(device):
        handle = _loss_handle(device.index, *settings)
        stream = torch.cuda.current_stream(device).cuda_stream
        lib.call(name, handle, _capi.ctypes.byref(call), _capi.ctypes.c_void_p(stream))


def _host_call(
    b, p, c, confidence, predicted_locations, labels, gt_locations, upstream=(1.0, 1.0), grads=None,
    layout=_capi.ROW_MAJOR, normalizer=_capi.NORMALIZE_POSITIVES, normalizer_value=0.0,
):
    grad_confidence, grad_locations = grads if grads is not None else (None, None)
    return _capi.HostCallF32(
        shape=_capi.Shape(b, p, c),
        label_type=_LABEL_TYPES[labels.dtype],
        confidence=confidence.data_ptr(),
        confidence_len=confidence.numel(),
        predicted_locations=predicted_locations.data_ptr(),
        predicted_locations_len=predicted_locations.numel(),
        labels=labels.data_ptr(),
        labels_len=labels.numel(),
        gt_locations=gt_locations.data_ptr(),
        gt_locations_len=gt_locations.numel(),
        g_reg=upstream[0],
        g_cls=upstream[1],
        grad_confidence=None if grad_confidence is None else grad_confidence.data_ptr(),
        grad_confidence_len=0 if grad_confidence is None else grad_confidence.numel(),
        grad_locations=None if grad_locations is None else grad_locations.data_ptr(),
        grad_locations_len=0 if grad_locations is None else grad_locations.numel(),
        mask=None,
        mask_len=0,
        layout=layout,
        normalizer=normalizer,
        normalizer_value=normalizer_value,
    )


def _workspace_bytes(device, b, p, c):
    """The forward's workspace: what the kernels need on CUDA; on the CPU,
    whose reference recomputes the rest, one float32, the divisor Given's
    forward read (so that the backward divides by it, as on CUDA)."""
    if device.type != "cuda":
        return 4
    return _capi.library().workspace_bytes(b, p, c)


def _host_normalizer(normalizer, normalizer_value, normalizer_tensor):
    """The CPU reference's (kind, n): a tensor's value is read here (a CPU
    tensor: no synchronisation)."""
    if normalizer == _capi.NORMALIZE_GIVEN and normalizer_tensor is not None:
        return normalizer, float(normalizer_tensor.reshape(()).item())
    return normalizer, float(normalizer_value)


def _device_normalizer(normalizer_tensor):
    """The one float32 the kernels read as Given's n, on the tensor's device:
    the tensor itself when it is a float32 element already, else a
    conversion queued on the current stream (an int64 count, say). Nothing
    is read on the host. The caching allocator keeps a temporary's block
    from other streams until the kernels queued on this one have run."""
    return normalizer_tensor.reshape(1).to(torch.float32).contiguous()


@torch.library.custom_op("multibox::forward", mutates_args=())
def _forward_op(
    confidence: Tensor,
    predicted_locations: Tensor,
    labels: Tensor,
    gt_locations: Tensor,
    neg_pos_ratio: float,
    min_negatives_per_image: int,
    beta: float,
    layout: int = 0,
    normalizer: int = 0,
    normalizer_value: float = 0.0,
    normalizer_tensor: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(regression_loss, classification_loss, num_pos, workspace): the losses
    (kernels 1 and 2), and what ``multibox::backward`` needs: a uint8
    workspace, on CUDA the mining decisions and the divisor, on the CPU
    Given's n as one float32 (0 for the other normalisers). ``layout`` is a
    ``multibox_layout``, ``normalizer`` a ``multibox_normalizer``; Given's n
    is ``normalizer_tensor`` (one element on the inputs' device) when it is
    not None, else ``normalizer_value``."""
    settings = _check_settings(neg_pos_ratio, min_negatives_per_image, beta)
    b, p, c = _check(confidence, predicted_locations, labels, gt_locations, layout)
    device = confidence.device
    _check_normalizer_tensor(normalizer_tensor, device)
    args = _contiguous(confidence, predicted_locations, labels, gt_locations)
    # PyTorch's caching allocator: blocks are 512-byte aligned, the kernels
    # need 256; nothing is allocated inside the library.
    workspace = torch.empty(_workspace_bytes(device, b, p, c), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        reg = torch.empty((), dtype=torch.float32, device=device)
        cls = torch.empty((), dtype=torch.float32, device=device)
        num_pos = torch.empty((), dtype=torch.int32, device=device)
        divisor = None
        if normalizer == _capi.NORMALIZE_GIVEN and normalizer_tensor is not None:
            divisor = _device_normalizer(normalizer_tensor)
        call = _device_call(
            b, p, c, *args, workspace,
            layout=layout,
            normalizer=normalizer,
            normalizer_value=normalizer_value,
            normalizer_device=0 if divisor is None else divisor.data_ptr(),
            regression_loss=reg.data_ptr(),
            classification_loss=cls.data_ptr(),
            num_pos=num_pos.data_ptr(),
        )
        _launch("multibox_forward", device, settings, call)
        # The input copies (if any) go back to the caching allocator here;
        # it does not hand them out to another stream before the kernels
        # queued on this one have run.
        return reg, cls, num_pos, workspace
    lib = _capi.library()
    losses = _capi.Losses()
    config = lib.config(*settings)
    kind, value = _host_normalizer(normalizer, normalizer_value, normalizer_tensor)
    call = _host_call(b, p, c, *args, layout=layout, normalizer=kind, normalizer_value=value)
    lib.call("multibox_reference_forward_f32", _capi.ctypes.byref(config), _capi.ctypes.byref(call),
             _capi.ctypes.byref(losses))
    reg = torch.tensor(losses.regression_loss, dtype=torch.float32)
    cls = torch.tensor(losses.classification_loss, dtype=torch.float32)
    num_pos = torch.tensor(losses.num_pos, dtype=torch.int32)
    # The n the reference divided by (a float32 in the C call), for the
    # backward: an output of this op, which torch.compile does not
    # recompute, so a normaliser tensor refilled before the backward (a
    # count per micro-batch) changes nothing, as on CUDA.
    workspace.view(torch.float32)[0] = call.normalizer_value if kind == _capi.NORMALIZE_GIVEN else 0.0
    return reg, cls, num_pos, workspace


@_forward_op.register_fake
def _(confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta,
      layout=0, normalizer=0, normalizer_value=0.0, normalizer_tensor=None):
    _check_settings(neg_pos_ratio, min_negatives_per_image, beta)
    b, p, c = _check(confidence, predicted_locations, labels, gt_locations, layout)
    device = confidence.device
    _check_normalizer_tensor(normalizer_tensor, device)
    if device.type != "cuda" or all(isinstance(n, int) for n in (b, p, c)):
        size = _workspace_bytes(device, b, p, c)
    else:
        # Symbolic shapes (torch.compile with dynamic=True): the layout is
        # the crate's business, so its size is a fresh symbol here.
        size = torch.library.get_ctx().new_dynamic_size()
    reg = torch.empty((), dtype=torch.float32, device=device)
    cls = torch.empty((), dtype=torch.float32, device=device)
    num_pos = torch.empty((), dtype=torch.int32, device=device)
    workspace = torch.empty((size,), dtype=torch.uint8, device=device)
    return reg, cls, num_pos, workspace


@torch.library.custom_op("multibox::backward", mutates_args=())
def _backward_op(
    confidence: Tensor,
    predicted_locations: Tensor,
    labels: Tensor,
    gt_locations: Tensor,
    workspace: Tensor,
    upstream: Tensor,
    neg_pos_ratio: float,
    min_negatives_per_image: int,
    beta: float,
    layout: int = 0,
    normalizer: int = 0,
) -> Tuple[Tensor, Tensor]:
    """(d total / d confidence, d total / d predicted_locations), contiguous,
    in the inputs' dtype and layout, for ``upstream = [g_reg, g_cls]`` (two
    float32 on the inputs' device): kernel 3 on the workspace of a
    ``multibox::forward`` on the same inputs and settings, which holds the
    forward's divisor (so ``normalizer`` is not read on CUDA). The CPU
    recomputes through the crate's reference instead, with the forward's
    ``normalizer`` kind and, for Given, the n its workspace holds."""
    settings = _check_settings(neg_pos_ratio, min_negatives_per_image, beta)
    b, p, c = _check(confidence, predicted_locations, labels, gt_locations, layout)
    device = confidence.device
    _check_with(RuntimeError, 
        upstream.shape == (2,) and upstream.device == device,
        lambda: f"upstream must be [2] on {device}, got {tuple(upstream.shape)} on {upstream.device}",
    )
    args = _contiguous(confidence, predicted_locations, labels, gt_locations)
    grad_confidence = torch.empty(confidence.shape, dtype=confidence.dtype, device=device)
    grad_locations = torch.empty(predicted_locations.shape, dtype=predicted_locations.dtype, device=device)
    if device.type == "cuda":
        _check_with(RuntimeError, workspace.dtype == torch.uint8 and workspace.is_contiguous(), lambda: "bad workspace")
        upstream = upstream.to(torch.float32).contiguous()
        # The backward divides by what its forward divided by (the
        # workspace holds it): no normaliser here.
        call = _device_call(
            b, p, c, *args, workspace,
            layout=layout,
            grad_confidence=grad_confidence.data_ptr(),
            grad_locations=grad_locations.data_ptr(),
            upstream=upstream.data_ptr(),
        )
        _launch("multibox_backward", device, settings, call)
        return grad_confidence, grad_locations
    _check_with(RuntimeError, workspace.dtype == torch.uint8 and workspace.shape == (4,), lambda: "bad workspace")
    lib = _capi.library()
    config = lib.config(*settings)
    g_reg, g_cls = upstream.to(torch.float32).tolist()
    value = float(workspace.view(torch.float32)[0])
    call = _host_call(
        b, p, c, *args, upstream=(g_reg, g_cls), grads=(grad_confidence, grad_locations),
        layout=layout, normalizer=normalizer, normalizer_value=value,
    )
    lib.call("multibox_reference_backward_f32", _capi.ctypes.byref(config), _capi.ctypes.byref(call), None)
    return grad_confidence, grad_locations


@_backward_op.register_fake
def _(confidence, predicted_locations, labels, gt_locations, workspace, upstream, neg_pos_ratio,
      min_negatives_per_image, beta, layout=0, normalizer=0):
    _check_settings(neg_pos_ratio, min_negatives_per_image, beta)
    _check(confidence, predicted_locations, labels, gt_locations, layout)
    # Exactly what the real implementation allocates: contiguous, the
    # inputs' shapes and dtypes, whatever the inputs' strides.
    grad_confidence = torch.empty(confidence.shape, dtype=confidence.dtype, device=confidence.device)
    grad_locations = torch.empty(
        predicted_locations.shape, dtype=predicted_locations.dtype, device=predicted_locations.device
    )
    return grad_confidence, grad_locations


def _backward_setup_context(ctx, inputs, output):
    pass


def _double_backward(ctx, *grads):
    # Reached only when a graph built with create_graph=True is
    # differentiated again (a first backward with create_graph=True alone
    # is fine): without this, autograd's "no autograd formula was
    # registered for multibox.backward.default" said nothing useful.
    raise RuntimeError(
        "multibox_loss does not support double backward (create_graph=True, then a backward through its "
        "gradients): its backward (multibox::backward, kernel 3) has no derivative. Take its gradients "
        "without create_graph=True, or leave multibox_loss out of the term whose gradient is differentiated"
    )


_backward_op.register_autograd(_double_backward, setup_context=_backward_setup_context)


def _setup_context(ctx, inputs, output):
    (confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta,
     layout, normalizer, normalizer_value, normalizer_tensor) = inputs
    _, _, num_pos, workspace = output
    # The inputs themselves (no copy) and the small workspace: nothing of
    # [B, P, C] is allocated to live until the backward. The workspace
    # holds the divisor the forward read (on both devices), so the
    # normaliser's own tensor is not kept: refilling it before the
    # backward (a count per micro-batch, say) changes nothing.
    ctx.save_for_backward(confidence, predicted_locations, labels, gt_locations, workspace)
    ctx.settings = (neg_pos_ratio, min_negatives_per_image, beta, layout, normalizer)
    ctx.mark_non_differentiable(num_pos, workspace)


def _backward(ctx, g_reg, g_cls, _g_num_pos, _g_workspace):
    confidence, predicted_locations, labels, gt_locations, workspace = ctx.saved_tensors
    need_confidence, need_locations = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # SPEC.md: no gradient flows to gt_locations (targets are constants);
    # a gt_locations that requires grad gets zeros rather than an error.
    d_gt = torch.zeros_like(gt_locations) if ctx.needs_input_grad[3] else None
    d_confidence = d_locations = None
    if need_confidence or need_locations:
        if g_reg is None or g_cls is None:
            # Autograd hands a loss that does not reach the output a zero
            # gradient of its own; a None (from a direct caller of this
            # function) means 0 as well.
            zero = torch.zeros((), dtype=torch.float32, device=confidence.device)
            g_reg = zero if g_reg is None else g_reg
            g_cls = zero if g_cls is None else g_cls
        # [g_reg, g_cls] stays on the device: kernel 3 reads it there.
        upstream = torch.stack([g.to(torch.float32).reshape(()) for g in (g_reg, g_cls)])
        d_confidence, d_locations = _backward_op(
            confidence, predicted_locations, labels, gt_locations, workspace, upstream, *ctx.settings
        )
        d_confidence = d_confidence if need_confidence else None
        d_locations = d_locations if need_locations else None
    # One entry per input of multibox::forward; the normaliser's tensor
    # (a count, say) gets none: the divisor is a constant of the loss.
    return d_confidence, d_locations, None, d_gt, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast(confidence, predicted_locations, gt_locations):
    """Under torch.autocast, the floating inputs are cast to one dtype the
    loss supports rather than refused: float32 on the CPU (whose reference
    is float32 only); on CUDA, the common dtype of confidence and
    predicted_locations when the kernels have it (so f16 or bf16 heads stay
    in their dtype), else float32. Gradients flow back through the casts."""
    device_type = confidence.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return confidence, predicted_locations, gt_locations
    if device_type == "cpu":
        target = torch.float32
    else:
        target = torch.promote_types(confidence.dtype, predicted_locations.dtype)
        if target not in _DTYPES:
            target = torch.float32

    def cast(t):
        return t.to(target) if t.dtype.is_floating_point and t.dtype != target else t

    return cast(confidence), cast(predicted_locations), cast(gt_locations)


def _loss_and_record(
    confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta,
    normalizer, layout,
):
    """``multibox_loss``'s ``(reg, cls, num_pos)`` and what ``_loss_status``
    reads afterwards: on CUDA ``(workspace, shape, settings)`` (the workspace
    is small, and the forward's output anyway: keeping it allocates
    nothing); on the CPU, whose reference keeps no status, the inputs as
    the op got them and the layout, for a check made only when asked; on
    the meta device, nothing (there are no values)."""
    _check_tensors("multibox_loss", confidence=confidence, predicted_locations=predicted_locations, labels=labels,
                   gt_locations=gt_locations)
    # Forward-mode AD has no formula here (custom_op's autograd serves the
    # backward only), and a dual input would get a zero tangent without a
    # word. gt_locations may carry one: its derivative is 0 (SPEC.md).
    for name, t in (("confidence", confidence), ("predicted_locations", predicted_locations)):
        if _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"multibox_loss has no forward-mode derivative, and {name} carries a tangent (torch.func.jvp, "
                "torch.autograd.forward_ad): take gradients with .backward() or torch.autograd.grad"
            )
    # torch.func.grad, vjp and jacrev: custom_op's autograd does not serve
    # them, and PyTorch's own error speaks of an autograd.Function the
    # caller never wrote. (Not while torch.compile traces: fake tensors are
    # no functorch wrappers, and the check would break the graph.)
    if _is_grad_tracking is not None and not torch.compiler.is_compiling():
        tensors = (confidence, predicted_locations, labels, gt_locations)
        if any(_is_grad_tracking(t) for t in tensors):
            raise NotImplementedError(
                "multibox_loss does not support torch.func.grad, vjp or jacrev (its backward is a custom "
                "op's autograd formula, which functorch's transforms do not call): take gradients with "
                ".backward() or torch.autograd.grad"
            )
    settings = _check_settings(neg_pos_ratio, min_negatives_per_image, beta)
    layout_kind = _check_layout(layout)
    kind, value, tensor = _check_normalizer(normalizer, confidence.device)
    confidence, predicted_locations, gt_locations = _autocast(confidence, predicted_locations, gt_locations)
    reg, cls, num_pos, workspace = _forward_op(
        confidence, predicted_locations, labels, gt_locations, *settings, layout_kind, kind, value, tensor
    )
    if confidence.device.type == "cuda":
        if layout_kind == _capi.ROW_MAJOR:
            b, p, c = confidence.shape
        else:
            b, c, p = confidence.shape
        record = ("cuda", workspace, (b, p, c), settings)
    elif confidence.device.type == "meta":
        record = ("meta",)
    else:
        # Detached: the values without the autograd graph that made them.
        inputs = (confidence.detach(), predicted_locations.detach(), labels, gt_locations.detach())
        record = ("cpu", *inputs, layout_kind)
    return reg, cls, num_pos, record


def _loss_status(record):
    """The ``LossStatus`` of the call ``record`` (from ``_loss_and_record``)
    describes. On CUDA the status word in its workspace, read once the
    device has finished its work; on the CPU the inputs checked now."""
    if record[0] == "cuda":
        _, workspace, shape, settings = record
        device = workspace.device
        lib = _capi.library()
        out = _capi.DeviceStatus()
        with torch.cuda.device(device):
            _wait_for_status("MultiboxLoss.last_status()", device)
            handle = _loss_handle(device.index, *settings)
            stream = torch.cuda.current_stream(device).cuda_stream
            lib.call(
                "multibox_status", handle, _capi.ctypes.byref(_capi.Shape(*shape)), workspace.data_ptr(),
                workspace.numel(), _capi.ctypes.c_void_p(stream), _capi.ctypes.byref(out),
            )
        # out.stale_workspace stays clear: the op's backward always gets its
        # own forward's workspace.
        return LossStatus(bool(out.invalid_label), bool(out.nonfinite_input))
    if record[0] == "meta":
        raise RuntimeError("last_status(): the last loss ran on meta tensors, which hold no values to check")
    _, confidence, predicted_locations, labels, gt_locations, layout = record
    with torch.no_grad():
        # What the kernels flag: any logit, and a positive's offset
        # difference (in the logits' dtype, as the op converts the targets).
        bad_logit = not bool(torch.isfinite(confidence).all())
        d = predicted_locations - gt_locations.to(confidence.dtype)
        finite_rows = torch.isfinite(d).all(dim=1 if layout == _capi.CHANNEL_MAJOR else 2)
        bad_offset = bool((~finite_rows & (labels > 0)).any())
    # The CPU reference refuses an invalid label (MultiboxError) before it
    # returns, so a call that returned had none.
    return LossStatus(invalid_label=False, nonfinite_input=bad_logit or bad_offset)


def multibox_loss(
    confidence: Tensor,
    predicted_locations: Tensor,
    labels: Tensor,
    gt_locations: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives_per_image: int = 0,
    beta: float = 1.0,
    *,
    normalizer=None,
    layout: str = "row_major",
) -> Tuple[Tensor, Tensor, Tensor]:
    """The SSD MultiBox loss: ``(regression_loss, classification_loss, num_pos)``.

    confidence ``[B, P, C]`` logits and predicted_locations ``[B, P, 4]`` (one
    dtype: f32, f16 or bf16 on CUDA; f32 on the CPU), labels ``[B, P]`` (int64
    or int32: -1 ignore, 0 background, 1..C-1 class), gt_locations
    ``[B, P, 4]`` (any floating dtype; converted to confidence's). All four on
    one device: CUDA, CPU, or meta (the outputs' shapes and dtypes, for shape
    inference; the gradients too). Any strides: non-contiguous inputs are
    copied for the call. Under ``torch.autocast`` the inputs are cast to a
    supported dtype (f32 on the CPU).

    ``layout="channel_major"`` takes confidence ``[B, C, P]`` and both
    location tensors ``[B, 4, P]`` instead (the layout of SSD heads
    concatenated without a transpose, as NVIDIA's SSD); labels stay
    ``[B, P]`` and the gradients come back in the inputs' layout.

    ``normalizer`` is what both losses (and so the gradients) are divided by
    (docs/SPEC.md, "Normalisation"):

    - ``None`` or ``"positives"`` (the default): N, the batch's positive count;
    - ``"per_image"``: each image by its own positive count, then the mean
      over the B images (NVIDIA's SSD recipe; an image without a positive
      adds 0);
    - a number n, or a one-element tensor on the inputs' device holding n
      (any real dtype: an int64 count from ``(labels > 0).sum()``, all-reduced
      across data-parallel ranks, say). On CUDA the kernels read the tensor
      in device memory: no host synchronisation. n is used as a float32:
      a number it would round to 0 or beyond is refused; a tensor is
      converted on the device (below float32's range 0, beyond it infinity),
      as the C ABI's device divisor is one float32. ``n <= 0`` gives zero
      losses and gradients, a non-finite n NaN losses. The tensor gets no
      gradient. A divisor that changes from step to step belongs in a
      tensor: under torch.compile a Python number is a constant of the
      graph, and each new one compiles the step again.

    The losses are 0-dim float32 tensors (0 when there is no positive),
    num_pos a 0-dim int32 tensor (this call's own positives, whatever the
    normaliser), all on the inputs' device; nothing is copied to the host.
    Differentiable with respect to confidence and predicted_locations: the
    forward runs two launches and keeps only the mining decisions; the
    backward runs one, scaled by the upstream gradients before the one
    rounding to the inputs' dtype. gt_locations gets a zero gradient if it
    requires one (no gradient flows to the targets).

    Each image mines ``floor(neg_pos_ratio * its positives)`` hard negatives
    (at least min_negatives_per_image, at most its background priors); a
    fractional product rounds down, where the reference code's ``orders <
    num_neg`` takes one more. neg_pos_ratio and beta must be positive and
    finite as float32s (not rounding to 0), min_negatives_per_image an integer
    in ``0..2**32-1``. Each distinct ``(neg_pos_ratio, min_negatives_per_image,
    beta)`` loads the kernels on the device once and keeps them for the life of
    the process (a CUDA graph may replay them at any time), so keep these
    settings fixed rather than scheduled per step. Under torch.compile each
    new value compiles again.

    An invalid label makes both losses NaN on the GPU and raises
    MultiboxError on the CPU. On the GPU, invalid labels and non-finite
    inputs are recorded in the device status word rather than stopping the
    step: ``MultiboxLoss`` keeps its last call's and ``last_status()`` reads
    it (one synchronising call, when the caller chooses).
    """
    reg, cls, num_pos, _ = _loss_and_record(
        confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta,
        normalizer, layout,
    )
    return reg, cls, num_pos


# Target assignment and the drop-in MultiboxLoss module (targets.py).
from .targets import MultiboxLoss, TargetStatus, assign_targets, pad_targets, standard_priors  # noqa: E402

__all__ += ["assign_targets", "pad_targets", "standard_priors", "MultiboxLoss", "TargetStatus"]
