"""The SSD MultiBox loss of the `multibox` crate as a PyTorch custom op.

    import multibox_torch
    reg, cls, num_pos = multibox_torch.multibox_loss(
        confidence, predicted_locations, labels, gt_locations, neg_pos_ratio=3.0)
    (reg + cls).backward()

CUDA tensors (f32, f16 or bf16; i64 or i32 labels) run the crate's fused
kernels on the current stream, with the workspace from PyTorch's caching
allocator: no host synchronisation, so the call can be captured in a CUDA
graph and traced by torch.compile (the op has a fake implementation). CPU
tensors (f32 only) run the crate's CPU reference, the same semantics in f64.

The library is loaded with ctypes from ``$MULTIBOX_LIB``, or next to this
package, or from the repository's ``target/release`` / ``target/debug``
(see ``_capi.find_library``).
"""

from typing import Tuple

import torch
from torch import Tensor

from . import _capi

__all__ = ["multibox_loss", "library_path"]

_DTYPES = {torch.float32: _capi.F32, torch.float16: _capi.F16, torch.bfloat16: _capi.BF16}
_LABEL_TYPES = {torch.int32: _capi.I32, torch.int64: _capi.I64}

# (device index, neg_pos_ratio, min_negatives_per_image, beta) -> multibox_loss*
# A loss loads the kernels once per device and configuration; it lives as
# long as the process.
_losses = {}


def library_path():
    """The path of the multibox library this package loads."""
    return _capi.library().path


def _loss_handle(device_index, neg_pos_ratio, min_negatives_per_image, beta):
    key = (device_index, float(neg_pos_ratio), int(min_negatives_per_image), float(beta))
    handle = _losses.get(key)
    if handle is None:
        lib = _capi.library()
        config = lib.config(neg_pos_ratio, min_negatives_per_image, beta)
        out = _capi.ctypes.c_void_p()
        lib.call("multibox_loss_create", device_index, _capi.ctypes.byref(config), _capi.ctypes.byref(out))
        handle = out.value
        _losses[key] = handle
    return handle


def _check(confidence, predicted_locations, labels, gt_locations):
    torch._check(confidence.dim() == 3, lambda: f"confidence must be [B, P, C], got {tuple(confidence.shape)}")
    b, p, c = confidence.shape
    torch._check(
        tuple(predicted_locations.shape) == (b, p, 4),
        lambda: f"predicted_locations must be [{b}, {p}, 4], got {tuple(predicted_locations.shape)}",
    )
    torch._check(tuple(labels.shape) == (b, p), lambda: f"labels must be [{b}, {p}], got {tuple(labels.shape)}")
    torch._check(
        tuple(gt_locations.shape) == (b, p, 4),
        lambda: f"gt_locations must be [{b}, {p}, 4], got {tuple(gt_locations.shape)}",
    )
    torch._check(confidence.dtype in _DTYPES, lambda: f"confidence must be f32, f16 or bf16, got {confidence.dtype}")
    torch._check(
        predicted_locations.dtype == confidence.dtype,
        lambda: f"predicted_locations is {predicted_locations.dtype}, confidence {confidence.dtype}",
    )
    torch._check(labels.dtype in _LABEL_TYPES, lambda: f"labels must be int64 or int32, got {labels.dtype}")
    return b, p, c


def _cuda_forward(confidence, predicted_locations, labels, gt_locations, ratio, min_neg, beta, need_grad):
    lib = _capi.library()
    b, p, c = confidence.shape
    device = confidence.device
    confidence = confidence.contiguous()
    predicted_locations = predicted_locations.contiguous()
    labels = labels.contiguous()
    gt_locations = gt_locations.to(confidence.dtype).contiguous()
    reg = torch.empty((), dtype=torch.float32, device=device)
    cls = torch.empty((), dtype=torch.float32, device=device)
    num_pos = torch.empty((), dtype=torch.int32, device=device)
    # PyTorch's caching allocator: blocks are 512-byte aligned, the kernels
    # need 256; nothing is allocated inside the library.
    workspace = torch.empty(lib.workspace_bytes(b, p, c), dtype=torch.uint8, device=device)
    if need_grad:
        grad_confidence = torch.empty_like(confidence)
        grad_locations = torch.empty_like(predicted_locations)
    else:
        grad_confidence = confidence.new_empty(0)
        grad_locations = predicted_locations.new_empty(0)
    call = _capi.Call(
        shape=_capi.Shape(b, p, c),
        dtype=_DTYPES[confidence.dtype],
        label_type=_LABEL_TYPES[labels.dtype],
        confidence=confidence.data_ptr(),
        predicted_locations=predicted_locations.data_ptr(),
        labels=labels.data_ptr(),
        gt_locations=gt_locations.data_ptr(),
        grad_confidence=grad_confidence.data_ptr() if need_grad else 0,
        grad_locations=grad_locations.data_ptr() if need_grad else 0,
        regression_loss=reg.data_ptr(),
        classification_loss=cls.data_ptr(),
        num_pos=num_pos.data_ptr(),
        mask=0,
        workspace=workspace.data_ptr(),
        workspace_bytes=workspace.numel(),
        upstream=0,
        g_reg=1.0,
        g_cls=1.0,
    )
    with torch.cuda.device(device):
        handle = _loss_handle(device.index, ratio, min_neg, beta)
        stream = torch.cuda.current_stream(device).cuda_stream
        name = "multibox_forward_backward" if need_grad else "multibox_forward"
        lib.call(name, handle, _capi.ctypes.byref(call), _capi.ctypes.c_void_p(stream))
    # The workspace goes back to the caching allocator when this function
    # returns; the allocator does not hand it out to work on another stream
    # before the kernels queued on this one have run.
    return reg, cls, num_pos, grad_confidence, grad_locations


def _cpu_forward(confidence, predicted_locations, labels, gt_locations, ratio, min_neg, beta, need_grad):
    torch._check(
        confidence.dtype == torch.float32,
        lambda: f"on the CPU (the crate's reference) only float32 is supported, got {confidence.dtype}",
    )
    lib = _capi.library()
    b, p, c = confidence.shape
    confidence = confidence.contiguous()
    predicted_locations = predicted_locations.contiguous()
    labels = labels.contiguous()
    gt_locations = gt_locations.to(torch.float32).contiguous()
    grad_confidence = torch.empty_like(confidence) if need_grad else confidence.new_empty(0)
    grad_locations = torch.empty_like(predicted_locations) if need_grad else predicted_locations.new_empty(0)
    call = _capi.HostCallF32(
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
        g_reg=1.0,
        g_cls=1.0,
        grad_confidence=grad_confidence.data_ptr() if need_grad else None,
        grad_confidence_len=grad_confidence.numel(),
        grad_locations=grad_locations.data_ptr() if need_grad else None,
        grad_locations_len=grad_locations.numel(),
        mask=None,
        mask_len=0,
    )
    config = lib.config(ratio, min_neg, beta)
    losses = _capi.Losses()
    name = "multibox_reference_forward_backward_f32" if need_grad else "multibox_reference_forward_f32"
    lib.call(name, _capi.ctypes.byref(config), _capi.ctypes.byref(call), _capi.ctypes.byref(losses))
    reg = torch.tensor(losses.regression_loss, dtype=torch.float32)
    cls = torch.tensor(losses.classification_loss, dtype=torch.float32)
    num_pos = torch.tensor(losses.num_pos, dtype=torch.int32)
    return reg, cls, num_pos, grad_confidence, grad_locations


@torch.library.custom_op("multibox::loss", mutates_args=())
def _loss_op(
    confidence: Tensor,
    predicted_locations: Tensor,
    labels: Tensor,
    gt_locations: Tensor,
    neg_pos_ratio: float,
    min_negatives_per_image: int,
    beta: float,
    need_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(reg, cls, num_pos, d cls / d confidence, d reg / d predicted_locations);
    the two gradients are for upstream 1 and empty unless need_grad."""
    _check(confidence, predicted_locations, labels, gt_locations)
    args = (confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta)
    if confidence.is_cuda:
        return _cuda_forward(*args, need_grad)
    torch._check(confidence.device.type == "cpu", lambda: f"unsupported device {confidence.device}")
    return _cpu_forward(*args, need_grad)


@_loss_op.register_fake
def _(confidence, predicted_locations, labels, gt_locations, neg_pos_ratio, min_negatives_per_image, beta, need_grad):
    _check(confidence, predicted_locations, labels, gt_locations)
    reg = confidence.new_empty((), dtype=torch.float32)
    cls = confidence.new_empty((), dtype=torch.float32)
    num_pos = confidence.new_empty((), dtype=torch.int32)
    if need_grad:
        return reg, cls, num_pos, torch.empty_like(confidence), torch.empty_like(predicted_locations)
    return reg, cls, num_pos, confidence.new_empty(0), predicted_locations.new_empty(0)


def _setup_context(ctx, inputs, output):
    need_grad = inputs[7]
    _, _, _, grad_confidence, grad_locations = output
    ctx.need_grad = need_grad
    ctx.save_for_backward(grad_confidence, grad_locations)
    ctx.mark_non_differentiable(output[2], output[3], output[4])


def _backward(ctx, g_reg, g_cls, _g_num_pos, _g_grad_confidence, _g_grad_locations):
    # d conf depends on the classification loss only and d loc on the
    # regression loss only, so the upstream-1 gradients of the forward are
    # scaled here, on the device, without a synchronisation. A power-of-two
    # upstream (loss scaling) scales exactly; any other value rounds a
    # second time in f16/bf16 (the kernels' own Upstream rounds once).
    grad_confidence, grad_locations = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("multibox::loss: backward of a call made with need_grad=False")
    d_conf = None if g_cls is None else (grad_confidence.float() * g_cls.float()).to(grad_confidence.dtype)
    d_loc = None if g_reg is None else (grad_locations.float() * g_reg.float()).to(grad_locations.dtype)
    return d_conf, d_loc, None, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def multibox_loss(
    confidence: Tensor,
    predicted_locations: Tensor,
    labels: Tensor,
    gt_locations: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives_per_image: int = 0,
    beta: float = 1.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The SSD MultiBox loss: ``(regression_loss, classification_loss, num_pos)``.

    confidence ``[B, P, C]`` logits and predicted_locations ``[B, P, 4]`` (f32,
    f16 or bf16 on CUDA; f32 on the CPU), labels ``[B, P]`` (int64 or int32:
    -1 ignore, 0 background, 1..C-1 class), gt_locations ``[B, P, 4]``. The
    losses are 0-dim float32 tensors (0 when there is no positive), num_pos
    a 0-dim int32 tensor, all on the inputs' device; nothing is copied to the
    host. Differentiable with respect to confidence and predicted_locations;
    the gradients are computed in the forward call (three fused launches)
    only when one of them requires grad (else two launches).

    An invalid label makes both losses NaN on the GPU (the device status
    word records it) and raises on the CPU.
    """
    need_grad = torch.is_grad_enabled() and (confidence.requires_grad or predicted_locations.requires_grad)
    reg, cls, num_pos, _, _ = _loss_op(
        confidence,
        predicted_locations,
        labels,
        gt_locations,
        float(neg_pos_ratio),
        int(min_negatives_per_image),
        float(beta),
        bool(need_grad),
    )
    return reg, cls, num_pos


# Target assignment and the drop-in MultiboxLoss module (targets.py).
from .targets import MultiboxLoss, assign_targets, pad_targets, standard_priors  # noqa: E402

__all__ += ["assign_targets", "pad_targets", "standard_priors", "MultiboxLoss"]
