"""``multibox_loss``'s ``normalizer=`` and ``layout=`` (SPEC.md,
"Normalisation (the divisor N)" and "Layouts"): a given divisor scales the
default losses and gradients by N / n, ``"per_image"`` is the mean of
one-image calls, channel-major inputs give the row-major results on the
transposed tensors, a tensor divisor equals the number, and every bad value
is refused with a message that says what is expected. CPU tensors here; the
CUDA cases run where a GPU is present (``scripts/gpu-check``).
"""

import math

import pytest
import torch

import multibox_torch
from multibox_torch import MultiboxLoss, _backward_op, _capi, _forward_op, multibox_loss

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]
# SPEC.md, "Precision": losses relative 1e-6, f32 gradients 1e-6 of the
# largest reference gradient.
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-6


def batch(device, seed=0, b=4, p=96, c=7, empty_image=None):
    """Random logits and offsets, ~30 % positives, a few ignored priors;
    image ``empty_image`` (if any) has no positive."""
    g = torch.Generator().manual_seed(seed)
    confidence = torch.randn(b, p, c, generator=g) * 2
    locations = torch.randn(b, p, 4, generator=g)
    gt = torch.randn(b, p, 4, generator=g)
    labels = torch.randint(1, c, (b, p), generator=g)
    u = torch.rand(b, p, generator=g)
    labels[u < 0.7] = 0
    labels[u > 0.97] = -1
    if empty_image is not None:
        labels[empty_image].clamp_(max=0)
    return confidence.to(device), locations.to(device), labels.to(device), gt.to(device)


def run(confidence, locations, labels, gt, g_reg=0.75, g_cls=2.5, **kwargs):
    """(reg, cls, num_pos, d confidence, d locations) with upstream g_reg, g_cls."""
    conf = confidence.detach().clone().requires_grad_()
    loc = locations.detach().clone().requires_grad_()
    reg, cls, num_pos = multibox_loss(conf, loc, labels, gt, **kwargs)
    (g_reg * reg + g_cls * cls).backward()
    return reg.detach(), cls.detach(), num_pos, conf.grad, loc.grad


def assert_loss(got, want, rtol=LOSS_RTOL):
    got, want = float(got), float(want)
    assert abs(got - want) <= rtol * max(abs(want), 1e-30), (got, want)


def assert_grad(got, want, tol=GRAD_TOL):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max().double().clamp(min=1e-30)
    err = ((got.double() - want.double()).abs().max() / scale).item()
    assert err <= tol, err


def cm(t):
    """Row-major [B, P, X] to channel-major [B, X, P], contiguous."""
    return t.transpose(1, 2).contiguous()


# --- Given(n) ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1.0, 7.5, 1000.0, 3])
def test_given_scales_the_default_by_n_over_the_positives(device, n):
    inputs = batch(device)
    reg, cls, num_pos, d_conf, d_loc = run(*inputs)
    g_reg, g_cls, g_num_pos, g_d_conf, g_d_loc = run(*inputs, normalizer=n)
    big_n = int(num_pos)
    assert big_n > 0 and torch.equal(g_num_pos, num_pos)
    scale = big_n / n
    assert_loss(g_reg, reg.double() * scale)
    assert_loss(g_cls, cls.double() * scale)
    assert_grad(g_d_conf, (d_conf.double() * scale).float())
    assert_grad(g_d_loc, (d_loc.double() * scale).float())


@pytest.mark.parametrize("device", DEVICES)
def test_given_the_positive_count_is_the_default(device):
    inputs = batch(device, seed=1)
    want = run(*inputs)
    got = run(*inputs, normalizer=float(int(want[2])))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make",
    [
        lambda n, d: torch.tensor(n, dtype=torch.int64, device=d),  # (labels > 0).sum()
        lambda n, d: torch.tensor([n], dtype=torch.int32, device=d),
        lambda n, d: torch.tensor([[n]], dtype=torch.float32, device=d),
        lambda n, d: torch.tensor(n, dtype=torch.float64, device=d),
        lambda n, d: torch.tensor([0.0, n], device=d)[1:],  # an offset view
        lambda n, d: torch.tensor(n, dtype=torch.float16, device=d),
    ],
    ids=["int64", "int32[1]", "f32[1,1]", "f64", "view", "f16"],
)
def test_a_tensor_normalizer_equals_the_number(device, make):
    inputs = batch(device, seed=2)
    n = 37
    want = run(*inputs, normalizer=float(n))
    got = run(*inputs, normalizer=make(n, device))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_backward_divides_by_what_the_forward_read(device, compiled, compile_backend):
    # Gradient accumulation that refills one count tensor per micro-batch
    # before a single backward: the backward divides by each forward's n.
    # Both devices keep n in the workspace. Before, the CPU backward re-read
    # the tensor (autograd's version check refused the refilled one), then
    # a copy of it, which Inductor recomputed from the refilled tensor.
    inputs = batch(device, seed=6)
    want = run(*inputs, normalizer=37.0)
    count = torch.tensor(37.0, device=device)
    conf = inputs[0].detach().clone().requires_grad_()
    loc = inputs[1].detach().clone().requires_grad_()

    def step(conf, loc, count):
        reg, cls, _ = multibox_loss(conf, loc, *inputs[2:], normalizer=count)
        return 0.75 * reg + 2.5 * cls

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend=compile_backend)
    total = step(conf, loc, count)
    count.fill_(5.0)
    total.backward()
    assert torch.equal(conf.grad, want[3]) and torch.equal(loc.grad, want[4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0.0, -3.0, "tensor0", "tensor-2"])
def test_given_n_at_most_zero_gives_zero_losses_and_gradients(device, n):
    inputs = batch(device, seed=3)
    if isinstance(n, str):
        n = torch.tensor(int(n[len("tensor"):]), device=device)
    reg, cls, num_pos, d_conf, d_loc = run(*inputs, normalizer=n)
    assert float(reg) == 0.0 and float(cls) == 0.0
    assert int(num_pos) == int((inputs[2] > 0).sum())
    assert torch.equal(d_conf, torch.zeros_like(d_conf)) and torch.equal(d_loc, torch.zeros_like(d_loc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [float("nan"), float("inf")])
def test_given_a_non_finite_n_gives_nan_losses(device, n):
    confidence, locations, labels, gt = batch(device, seed=4)
    for normalizer in (n, torch.tensor(n, device=device)):
        reg, cls, _ = multibox_loss(confidence, locations, labels, gt, normalizer=normalizer)
        assert math.isnan(float(reg)) and math.isnan(float(cls))


# --- PerImage ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_major", "channel_major"])
def test_per_image_is_the_mean_of_one_image_calls(device, layout):
    # Image 2 has no positive: it adds 0 to the mean (and gets no gradient).
    confidence, locations, labels, gt = batch(device, seed=5, empty_image=2)
    b = confidence.shape[0]
    if layout == "channel_major":
        confidence, locations, gt = cm(confidence), cm(locations), cm(gt)
    reg, cls, num_pos, d_conf, d_loc = run(confidence, locations, labels, gt, normalizer="per_image", layout=layout)
    assert int(num_pos) == int((labels > 0).sum())
    ones = [run(confidence[i:i + 1], locations[i:i + 1], labels[i:i + 1], gt[i:i + 1], layout=layout)
            for i in range(b)]
    assert float(ones[2][0]) == 0.0 and float(ones[2][1]) == 0.0
    assert_loss(reg, sum(o[0].double() for o in ones) / b)
    assert_loss(cls, sum(o[1].double() for o in ones) / b)
    # Image i's rows: the one-image gradient (upstream included) over B.
    assert_grad(d_conf, (torch.cat([o[3] for o in ones]).double() / b).float())
    assert_grad(d_loc, (torch.cat([o[4] for o in ones]).double() / b).float())
    assert torch.equal(d_conf[2], torch.zeros_like(d_conf[2]))


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_with_no_positive_at_all_is_zero(device):
    confidence, locations, labels, gt = batch(device, seed=6, b=2)
    labels = labels.clamp(max=0)
    reg, cls, num_pos, d_conf, _ = run(confidence, locations, labels, gt, normalizer="per_image")
    assert float(reg) == 0.0 and float(cls) == 0.0 and int(num_pos) == 0
    assert torch.equal(d_conf, torch.zeros_like(d_conf))


# --- Layouts ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalizer", [None, "per_image", 11.0], ids=["positives", "per_image", "given"])
@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32])
def test_channel_major_equals_row_major_on_transposed_inputs(device, normalizer, labels_dtype):
    confidence, locations, labels, gt = batch(device, seed=7, p=300, c=21)
    labels = labels.to(labels_dtype)
    want = run(confidence, locations, labels, gt, normalizer=normalizer)
    got = run(cm(confidence), cm(locations), labels, cm(gt), normalizer=normalizer, layout="channel_major")
    assert torch.equal(got[2], want[2])
    assert_loss(got[0], want[0])
    assert_loss(got[1], want[1])
    # Gradients in the input layout: [B, C, P] and [B, 4, P].
    assert got[3].shape == cm(confidence).shape and got[3].is_contiguous()
    assert got[4].shape == cm(locations).shape and got[4].is_contiguous()
    assert_grad(got[3], cm(want[3]))
    assert_grad(got[4], cm(want[4]))


@pytest.mark.parametrize("device", DEVICES)
def test_channel_major_views_are_accepted(device):
    # A [B, C, P] view of row-major storage (and the reverse): copied for the
    # call, the same results.
    confidence, locations, labels, gt = batch(device, seed=8)
    want = run(cm(confidence), cm(locations), labels, cm(gt), layout="channel_major")
    views = (confidence.transpose(1, 2), locations.transpose(1, 2), labels, gt.transpose(1, 2))
    assert not views[0].is_contiguous()
    got = run(*views, layout="channel_major")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_the_new_arguments(device, opcheck_forward):
    confidence, locations, labels, gt = batch(device, seed=9, b=2, p=40, c=5)
    conf, loc, ground = cm(confidence), cm(locations), cm(gt)
    count = (labels > 0).sum()
    cases = [
        (_capi.CHANNEL_MAJOR, _capi.NORMALIZE_PER_IMAGE, 0.0, None),
        (_capi.CHANNEL_MAJOR, _capi.NORMALIZE_GIVEN, 0.0, count),
        (_capi.ROW_MAJOR, _capi.NORMALIZE_GIVEN, 6.5, None),
    ]
    for layout, kind, value, tensor in cases:
        args = (conf, loc, ground) if layout == _capi.CHANNEL_MAJOR else (confidence, locations, gt)
        c_, l_, g_ = (a.detach().requires_grad_(i < 2) for i, a in enumerate(args))
        opcheck_forward((c_, l_, labels, g_, 3.0, 0, 1.0, layout, kind, value, tensor))
        c_, l_ = c_.detach(), l_.detach()
        _, _, _, workspace = _forward_op(c_, l_, labels, g_, 3.0, 0, 1.0, layout, kind, value, tensor)
        upstream = torch.tensor([0.75, 2.5], device=device)
        torch.library.opcheck(
            _backward_op, (c_, l_, labels, g_, workspace, upstream, 3.0, 0, 1.0, layout, kind)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_a_count_tensor_and_channel_major(device, compile_backend):
    confidence, locations, labels, gt = batch(device, seed=10)
    conf0, loc0, gt0 = cm(confidence), cm(locations), cm(gt)

    def step(conf, loc, labels, gt):
        count = (labels > 0).sum() * 2  # as an all-reduced count over two ranks would be
        reg, cls, num_pos = multibox_loss(conf, loc, labels, gt, normalizer=count, layout="channel_major")
        return 0.5 * reg + 2.0 * cls, num_pos

    def go(f):
        conf = conf0.detach().requires_grad_()
        loc = loc0.detach().requires_grad_()
        total, num_pos = f(conf, loc, labels, gt0)
        total.backward()
        return total.detach(), num_pos, conf.grad, loc.grad

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for got, want in zip(go(compiled), go(step)):
        assert torch.equal(got, want)


# --- CUDA only ---------------------------------------------------------------


@needs_gpu
def test_cuda_count_tensor_without_host_synchronisation():
    # The count is converted to float32 and read by the kernels on the
    # device; torch's sync debug mode raises on anything that waits for it.
    confidence, locations, labels, gt = batch("cuda", seed=11)
    conf = confidence.clone().requires_grad_()
    loc = locations.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        count = (labels > 0).sum()
        reg, cls, _ = multibox_loss(conf, loc, labels, gt, normalizer=count * 3, layout="row_major")
        (reg + cls).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = run(confidence, locations, labels, gt, g_reg=1.0, g_cls=1.0, normalizer=float(3 * int(count)))
    assert torch.equal(reg, want[0]) and torch.equal(cls, want[1])
    assert torch.equal(conf.grad, want[3]) and torch.equal(loc.grad, want[4])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_channel_major_equals_row_major(dtype):
    confidence, locations, labels, gt = (t.to(dtype) if t.is_floating_point() else t for t in batch("cuda", seed=12))
    want = run(confidence, locations, labels, gt, normalizer="per_image")
    got = run(cm(confidence), cm(locations), labels, cm(gt), normalizer="per_image", layout="channel_major")
    assert torch.equal(got[2], want[2])
    assert_loss(got[0], want[0])
    assert_loss(got[1], want[1])
    # Both layouts compute each row's statistics with the same lanes in the
    # same order: the gradients are the same bits.
    assert torch.equal(got[3], cm(want[3])) and torch.equal(got[4], cm(want[4]))


@needs_gpu
def test_cuda_matches_the_cpu_reference_for_each_normaliser():
    inputs = batch("cpu", seed=13, p=300, c=21, empty_image=1)
    for normalizer in (None, "per_image", 9.0):
        want = run(*inputs, normalizer=normalizer)
        got = run(*(t.cuda() for t in inputs), normalizer=normalizer)
        assert int(got[2]) == int(want[2])
        assert_loss(got[0].cpu(), want[0], rtol=1e-5)
        assert_loss(got[1].cpu(), want[1], rtol=1e-5)
        assert_grad(got[3].cpu(), want[3], tol=1e-5)
        assert_grad(got[4].cpu(), want[4], tol=1e-5)


@needs_gpu
def test_cuda_normalizer_tensor_on_another_device_is_refused():
    confidence, locations, labels, gt = batch("cuda", seed=14)
    with pytest.raises(Exception, match="normalizer tensor is on cpu"):
        multibox_loss(confidence, locations, labels, gt, normalizer=torch.tensor(5.0))


# --- bad values ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["mean", "Positives", "per-image", ""])
def test_unknown_normalizer_strings_are_refused(value):
    inputs = batch("cpu")
    with pytest.raises(ValueError, match="normalizer must be None, 'positives', 'per_image'"):
        multibox_loss(*inputs, normalizer=value)


@pytest.mark.parametrize("value", [True, False, [3.0], object(), 1j])
def test_normalizer_of_a_wrong_type_is_refused(value):
    inputs = batch("cpu")
    with pytest.raises(TypeError, match="normalizer must be None, 'positives', 'per_image'"):
        multibox_loss(*inputs, normalizer=value)


def test_normalizer_tensors_are_checked():
    inputs = batch("cpu")
    with pytest.raises(ValueError, match="must hold one element .* got shape \\(2,\\)"):
        multibox_loss(*inputs, normalizer=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="must hold one element .* got shape \\(0,\\)"):
        multibox_loss(*inputs, normalizer=torch.tensor([]))
    with pytest.raises(TypeError, match="must be real numbers, got torch.bool"):
        multibox_loss(*inputs, normalizer=torch.tensor(True))
    with pytest.raises(TypeError, match="must be real numbers, got torch.complex64"):
        multibox_loss(*inputs, normalizer=torch.tensor(1 + 0j, dtype=torch.complex64))
    # The meta device stands in for another device on a machine without a GPU.
    with pytest.raises(Exception, match="normalizer tensor is on meta, the loss's inputs on cpu"):
        multibox_loss(*inputs, normalizer=torch.tensor(3.0, device="meta"))


def test_normalizer_beyond_float32_is_refused():
    inputs = batch("cpu")
    with pytest.raises(ValueError, match="out of float32's range"):
        multibox_loss(*inputs, normalizer=1e39)
    # Integers too large for a float: before, float() raised a bare
    # OverflowError ("int too large to convert to float").
    for huge in (10**400, -(10**400)):
        with pytest.raises(ValueError, match="multibox_loss: normalizer .* is out of float32's range"):
            multibox_loss(*inputs, normalizer=huge)
    # One that float32 rounds to 0 would mean "no positives": zero losses,
    # silently. The smallest float32 itself is a divisor like any other.
    for tiny in (1e-50, -1e-50, 2.0**-150):
        with pytest.raises(ValueError, match="rounds to 0 in float32"):
            multibox_loss(*inputs, normalizer=tiny)
    reg, cls, _ = multibox_loss(*inputs, normalizer=2.0**-150 * 1.0000001)  # rounds to 2**-149
    assert reg.item() > 0 and cls.item() > 0


@pytest.mark.parametrize("value", ["NCHW", "rowmajor", 0, 1, None])
def test_unknown_layouts_are_refused(value):
    inputs = batch("cpu")
    with pytest.raises(ValueError, match="layout must be one of \\['channel_major', 'row_major'\\]"):
        multibox_loss(*inputs, layout=value)


def test_shapes_are_checked_in_each_layout():
    confidence, locations, labels, gt = batch("cpu", b=2, p=40, c=5)
    # Row-major tensors called channel-major: confidence reads as [2, 40, 5]
    # = [B, C, P], so the locations must be [2, 4, 5].
    with pytest.raises(Exception, match="predicted_locations must be \\[2, 4, 5\\] \\(layout='channel_major'\\)"):
        multibox_loss(confidence, locations, labels, gt, layout="channel_major")
    with pytest.raises(Exception, match="labels must be \\[2, 40\\], got \\(2, 5\\)"):
        multibox_loss(cm(confidence), cm(locations), labels[:, :5], cm(gt), layout="channel_major")
    with pytest.raises(Exception, match="gt_locations must be \\[2, 4, 40\\] \\(layout='channel_major'\\)"):
        multibox_loss(cm(confidence), cm(locations), labels, gt, layout="channel_major")
    with pytest.raises(Exception, match="confidence must be \\[B, C, P\\] \\(layout='channel_major'\\)"):
        multibox_loss(confidence[0], cm(locations), labels, cm(gt), layout="channel_major")
    # Channel-major tensors called row-major.
    with pytest.raises(Exception, match="predicted_locations must be \\[2, 5, 4\\], got \\(2, 4, 40\\)"):
        multibox_loss(cm(confidence), cm(locations), labels, cm(gt))


def test_the_default_call_is_unchanged():
    # The keyword arguments are optional and keyword-only; the positional
    # settings keep their places.
    inputs = batch("cpu", seed=15)
    want = run(*inputs, normalizer=None, layout="row_major")
    got = run(*inputs, normalizer="positives")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    reg, cls, _ = multibox_loss(*inputs, 3.0, 0, 1.0)
    assert torch.equal(reg, want[0]) and torch.equal(cls, want[1])
    with pytest.raises(TypeError):
        multibox_loss(*inputs, 3.0, 0, 1.0, "per_image")


# --- the MultiboxLoss module --------------------------------------------------


def test_module_takes_the_normalizer_and_layout():
    confidence, locations, labels, gt = batch("cpu", seed=16)
    priors = multibox_torch.standard_priors("ssdlite300")
    want = run(cm(confidence), cm(locations), labels, cm(gt), g_reg=1.0, g_cls=1.0, normalizer="per_image",
               layout="channel_major")
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer="per_image", layout="channel_major")
    conf = cm(confidence).requires_grad_()
    loc = cm(locations).requires_grad_()
    reg, cls = criterion(conf, loc, labels, cm(gt))
    (reg + cls).backward()
    assert torch.equal(reg.detach(), want[0]) and torch.equal(cls.detach(), want[1])
    assert torch.equal(conf.grad, want[3]) and torch.equal(loc.grad, want[4])
    # A per-call divisor (a step's all-reduced count) replaces the module's.
    count = (labels > 0).sum() * 2
    reg, cls = criterion(cm(confidence), cm(locations), labels, cm(gt), normalizer=count)
    want = run(cm(confidence), cm(locations), labels, cm(gt), normalizer=float(count), layout="channel_major")
    assert torch.equal(reg, want[0]) and torch.equal(cls, want[1])
    with pytest.raises(ValueError, match="layout must be one of"):
        MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", layout="nchw")
    with pytest.raises(ValueError, match="normalizer must be"):
        MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer="mean")


def test_module_moves_a_normalizer_tensor_to_its_device():
    # As the constructor's device= moves the priors; the meta device stands
    # in for a GPU, and the forward refuses a divisor on another device.
    priors = multibox_torch.standard_priors("ssdlite300")
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "meta", normalizer=torch.tensor(5.0))
    assert criterion.priors.device.type == "meta" and criterion.normalizer.device.type == "meta"
    meta = [torch.empty(2, 3000, c, device="meta") for c in (21, 4)]
    labels = torch.empty(2, 3000, dtype=torch.int64, device="meta")
    reg, cls = criterion(meta[0], meta[1], labels, meta[1])
    assert reg.device.type == "meta" and reg.shape == ()
    # On its own device already: the caller's tensor itself, refills and all.
    count = torch.tensor(5.0)
    assert MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer=count).normalizer is count


def test_module_assign_gives_channel_major_targets():
    priors = multibox_torch.standard_priors("ssdlite300")
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]), torch.tensor([[0.2, 0.3, 0.6, 0.9]])]
    classes = [torch.tensor([3, 7]), torch.tensor([1])]
    row = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu")
    col = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", layout="channel_major")
    labels, gt = row.assign(boxes, classes)
    labels_cm, gt_cm = col.assign(boxes, classes)
    assert torch.equal(labels, labels_cm)
    assert gt_cm.shape == (2, 4, priors.shape[0]) and torch.equal(gt_cm, gt.transpose(1, 2))
    g = torch.Generator().manual_seed(0)
    confidence = torch.randn(2, 21, priors.shape[0], generator=g)
    locations = torch.randn(2, 4, priors.shape[0], generator=g)
    reg, cls = col(confidence, locations, labels_cm, gt_cm)
    want_reg, want_cls = row(cm(confidence), cm(locations), labels, gt)
    assert_loss(reg, want_reg)
    assert_loss(cls, want_cls)


def test_module_repr_names_its_settings():
    priors = multibox_torch.standard_priors("ssdlite300")
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer="per_image", layout="channel_major",
                             num_classes=21)
    text = repr(criterion)
    for part in ("priors=(3000, 4)", "iou_threshold=0.5", "neg_pos_ratio=3", "center_variance=0.1",
                 "size_variance=0.2", "normalizer='per_image'", "layout='channel_major'", "num_classes=21"):
        assert part in text, text
    # A tensor normaliser by its metadata: its value may be on a GPU.
    text = repr(MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer=torch.tensor(300)))
    assert "normalizer=tensor(shape=(), dtype=torch.int64, device=cpu)" in text and "num_classes=None" in text


@pytest.mark.parametrize("n", [torch.tensor(4097.0), torch.tensor([4097]), torch.tensor(4097.0, dtype=torch.float64)])
def test_module_normalizer_tensor_follows_the_module_and_keeps_its_dtype(n):
    # A normaliser tensor given to the constructor is a non-persistent
    # buffer: .to(device) and .cuda() move it (before, it stayed where it
    # was and the next forward refused it), state_dict() stays empty, and
    # .half() leaves it in its dtype (float16 would make 4097 a 4096).
    confidence, locations, labels, gt = batch("cpu", seed=17)
    want = run(confidence, locations, labels, gt, g_reg=1.0, g_cls=1.0, normalizer=4097.0)
    priors = multibox_torch.standard_priors("ssdlite300")
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu", normalizer=n.clone())
    assert list(criterion.state_dict()) == [] and list(criterion.buffers()) != []
    criterion.load_state_dict({})
    conversions = (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(), lambda m: m.to(torch.float16),
                   lambda m: m.float())
    for convert in conversions:
        assert convert(criterion) is criterion
        assert criterion.normalizer.dtype == n.dtype and criterion.normalizer.item() == 4097
        reg, cls = criterion(confidence, locations, labels, gt)
        assert torch.equal(reg, want[0]) and torch.equal(cls, want[1])
    assert list(criterion.state_dict()) == []
    # The meta device stands in for a GPU; the priors are an attribute (as
    # in the reference) and stay.
    criterion.to("meta")
    assert criterion.normalizer.device.type == "meta" and criterion.normalizer.dtype == n.dtype
    assert criterion.priors.device.type == "cpu"
    # Another setting may replace it, and a tensor again.
    criterion.normalizer = "per_image"
    assert criterion.normalizer == "per_image" and list(criterion.buffers()) == []
    criterion.normalizer = torch.tensor(2.0)
    assert criterion.to(torch.float16).normalizer.dtype == torch.float32
    with pytest.raises(ValueError, match="normalizer must be None, 'positives', 'per_image'"):
        criterion.normalizer = "mean"

