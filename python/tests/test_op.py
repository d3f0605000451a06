"""The PyTorch op as a user installs it (``pip install ./python``): the golden
cases against the crate's expectations, ``torch.library.opcheck`` and
``torch.compile`` on non-contiguous, sliced and expanded inputs, gradients
against autograd through a plain-PyTorch reference, what the backward keeps,
and every bad input. CPU tensors here (the crate's reference); the CUDA cases
run where a GPU is present (``scripts/gpu-check``).

    pip install ./python && python -m pytest -q python/tests
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multibox_torch
from multibox_torch import _backward_op, _capi, _forward_op, multibox_loss

ROOT = Path(__file__).resolve().parents[2]
# $MULTIBOX_GOLDENS runs another folder of cases in the same format.
GOLDENS = Path(os.environ.get("MULTIBOX_GOLDENS", ROOT / "tests" / "goldens"))
CASES = sorted(p.name for p in GOLDENS.iterdir() if (p / "case.json").exists())
assert CASES, f"no golden case in {GOLDENS}"  # an empty parameter list would only skip
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Tolerances (docs/SPEC.md, "Precision"): losses relative to the f64
# expectation, 1e-6 whatever the input type (the arithmetic is f32 on exact
# input values); gradients relative to the largest gradient magnitude: 1e-6
# in f32, and about an ulp of the largest in f16 (2^-10) and bf16 (2^-7),
# where SPEC.md's bound is an ulp of each value.
LOSS_RTOL = 1e-6
GRAD_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]


def _meta(case, folder=None):
    return json.loads(((folder or GOLDENS) / case / "case.json").read_text())


def _array(case, name, dtype, folder=None):
    raw = bytearray(((folder or GOLDENS) / case / f"{name}.bin").read_bytes())
    shape = _meta(case, folder)["files"][name]["shape"]
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


def load(case, device, folder=None):
    meta = _meta(case, folder)
    dtype = DTYPES[meta["input_dtype"]]
    label_dtype = torch.int64 if meta["label_dtype"] == "i64" else torch.int32
    t = {
        "confidence": _array(case, "confidence", torch.float32, folder).to(dtype),
        "locations": _array(case, "locations", torch.float32, folder).to(dtype),
        "labels": _array(case, "labels", label_dtype, folder),
        "gt_locations": _array(case, "gt_locations", torch.float32, folder).to(dtype),
        "grad_confidence": _array(case, "grad_confidence", torch.float32, folder),
        "grad_locations": _array(case, "grad_locations", torch.float32, folder),
    }
    return meta, {k: v.to(device) for k, v in t.items()}


def torch_reference(confidence, locations, labels, gt, neg_pos_ratio, min_neg=0, beta=1.0):
    """SPEC.md's algorithm in plain PyTorch, float64: stable descending sort
    (ties to the lower prior index), -1 ignored, 0 (not NaN) without positives.
    Differentiable through CE and smooth-L1; the mask is a constant."""
    x = confidence.double()
    pos = labels > 0
    with torch.no_grad():
        bg = torch.logsumexp(x.float(), dim=2) - x.float()[:, :, 0]  # the key, in f32 as specified
        bg = bg.double().masked_fill(labels != 0, -float("inf"))
        order = torch.sort(bg, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        candidates = (labels == 0).sum(dim=1, keepdim=True)
        k = torch.floor(pos.sum(dim=1, keepdim=True).double() * neg_pos_ratio).long()
        k = torch.minimum(torch.clamp(k, min=min_neg), candidates)
        mask = pos | ((rank < k) & (labels == 0))
    n = pos.sum()
    ce = torch.logsumexp(x, dim=2) - x.gather(2, labels.clamp(min=0).long().unsqueeze(2)).squeeze(2)
    cls = (ce * mask).sum()
    d = locations.double() - gt.double()
    sl1 = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
    reg = (sl1.sum(dim=2) * pos).sum()
    if n == 0:
        return reg * 0, cls * 0, mask
    return reg / n, cls / n, mask


# Every f32 case on the CPU (the reference is f32 only there), every case on CUDA.
GOLDEN_PARAMS = [pytest.param(case, "cpu", id=f"{case}-cpu") for case in CASES if _meta(case)["input_dtype"] == "f32"] + [
    pytest.param(case, "cuda", id=f"{case}-cuda", marks=needs_gpu) for case in CASES
]


@pytest.mark.parametrize("case,device", GOLDEN_PARAMS)
def test_golden(case, device):
    check_golden(case, device)


def check_golden(case, device, folder=None):
    meta, t = load(case, device, folder)
    dtype = t["confidence"].dtype
    confidence = t["confidence"].clone().requires_grad_()
    locations = t["locations"].clone().requires_grad_()
    reg, cls, num_pos = multibox_loss(confidence, locations, t["labels"], t["gt_locations"], meta["neg_pos_ratio"])
    (reg + cls).backward()
    assert int(num_pos) == meta["num_pos"]
    for got, want in [(reg.item(), meta["regression_loss"]), (cls.item(), meta["classification_loss"])]:
        assert abs(got - want) <= LOSS_RTOL * max(abs(want), 1e-30), (got, want)
    for got, want in [(confidence.grad, t["grad_confidence"]), (locations.grad, t["grad_locations"])]:
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().clamp(min=1e-30)
        err = ((got.float() - want).abs().max() / scale).item()
        assert err <= GRAD_TOL[dtype], err
    # The plain-PyTorch reference agrees with the golden numbers too.
    r_reg, r_cls, _ = torch_reference(
        t["confidence"], t["locations"], t["labels"], t["gt_locations"], meta["neg_pos_ratio"]
    )
    assert abs(r_reg.item() - meta["regression_loss"]) <= 1e-9 * max(abs(meta["regression_loss"]), 1.0)
    assert abs(r_cls.item() - meta["classification_loss"]) <= 1e-6 * max(abs(meta["classification_loss"]), 1.0)


def test_random_goldens_script_writes_cases_the_op_meets(tmp_path):
    """scripts/random_goldens.py's loss cases (expected values from float64
    autograd, apart from the crate) in the goldens' format: the f32 ones
    through the op on the CPU, as test_golden runs the committed ones."""
    script = ROOT / "scripts" / "random_goldens.py"
    subprocess.run([sys.executable, str(script), "loss", str(tmp_path), "--seed", "5", "--count", "12"],
                   check=True, capture_output=True)
    cases = sorted(p.name for p in tmp_path.iterdir() if (p / "case.json").exists())
    assert len(cases) == 12
    f32_cases = [c for c in cases if _meta(c, tmp_path)["input_dtype"] == "f32"]
    assert f32_cases, "seed 5 draws f32 cases"
    for case in f32_cases:
        check_golden(case, "cpu", tmp_path)


def _small(device, dtype=torch.float32, seed=0, b=2, p=64, c=5):
    g = torch.Generator().manual_seed(seed)
    confidence = (torch.randn(b, p, c, generator=g) * 2).to(device, dtype)
    locations = torch.randn(b, p, 4, generator=g).to(device, dtype)
    gt = torch.randn(b, p, 4, generator=g).to(device, dtype)
    labels = torch.randint(0, c, (b, p), generator=g)
    labels[torch.rand(b, p, generator=g) < 0.6] = 0
    labels[0, 3] = -1
    return confidence, locations, labels.to(device), gt


def _layouts(device, dtype=torch.float32):
    """The same values in layouts the op must accept: contiguous, transposed
    (channel-major storage), sliced out of larger tensors, and expanded
    (stride 0 over the batch)."""
    confidence, locations, labels, gt = _small(device, dtype)
    b, p, c = confidence.shape

    def transposed(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    def sliced(t):
        big = torch.zeros((b, 2 * p, t.shape[2] + 3), dtype=t.dtype, device=device)
        big[:, ::2, 1:1 + t.shape[2]] = t
        return big[:, ::2, 1:1 + t.shape[2]]

    one = _small(device, dtype, seed=1, b=1)
    expanded = tuple(t.expand(b, *t.shape[1:]) for t in one)
    return {
        "contiguous": (confidence, locations, labels, gt),
        "transposed": (transposed(confidence), transposed(locations), labels.t().contiguous().t(), transposed(gt)),
        "sliced": (sliced(confidence), sliced(locations), torch.stack([labels, labels], 2)[..., 0], sliced(gt)),
        "expanded": expanded,
    }


LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_forward_and_backward(device, layout, opcheck_forward):
    confidence, locations, labels, gt = _layouts(device)[layout]
    if layout != "contiguous":
        assert not confidence.is_contiguous()
    for requires_grad in (True, False):
        conf = confidence.detach().requires_grad_(requires_grad)
        loc = locations.detach().requires_grad_(requires_grad)
        opcheck_forward((conf, loc, labels, gt, 3.0, 0, 1.0))
    _, _, _, workspace = _forward_op(confidence, locations, labels, gt, 3.0, 0, 1.0)
    upstream = torch.tensor([0.75, 2.5], device=device)
    torch.library.opcheck(_backward_op, (confidence, locations, labels, gt, workspace, upstream, 3.0, 0, 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_torch_compile_fullgraph_matches_eager(device, layout, compile_backend):
    confidence, locations, labels, gt = _layouts(device)[layout]

    def step(confidence, locations, labels, gt):
        reg, cls, num_pos = multibox_loss(confidence, locations, labels, gt, 3.0)
        return 0.5 * reg + 2.0 * cls, num_pos

    def run(f):
        conf = confidence.detach().requires_grad_()
        loc = locations.detach().requires_grad_()
        total, num_pos = f(conf, loc, labels, gt)
        total.backward()
        return total.detach(), num_pos, conf.grad, loc.grad

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for got, want in zip(run(compiled), run(step)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [True, None])
def test_torch_compile_with_symbolic_float_settings(device, dynamic, compile_backend):
    # Before, _check_settings and _check_normalizer called math.isfinite,
    # which Dynamo cannot trace on a symbolic float: fullgraph failed with
    # dynamic=True, and without it from the second float value on (the
    # float turns symbolic then). Each new value still compiles again (a
    # custom op's float is a constant of the graph), but it runs.
    confidence, locations, labels, gt = _small(device)

    def step(confidence, locations, labels, gt, ratio, beta, n):
        reg, cls, num_pos = multibox_loss(confidence, locations, labels, gt, ratio, 1, beta, normalizer=n)
        return 0.5 * reg + 2.0 * cls, num_pos

    def run(f, *settings):
        conf = confidence.detach().requires_grad_()
        loc = locations.detach().requires_grad_()
        total, num_pos = f(conf, loc, labels, gt, *settings)
        total.backward()
        return total.detach(), num_pos, conf.grad, loc.grad

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=compile_backend)
    for settings in [(3.0, 1.0, 3.0), (2.5, 0.5, 4.0), (4.0, 2.0, 7.5), (1.5, 0.25, 9.0)]:
        for got, want in zip(run(compiled, *settings), run(step, *settings)):
            assert torch.equal(got, want), settings
    # Bad values are still refused, with the eager messages.
    for name, bad in (("neg_pos_ratio", float("nan")), ("beta", float("inf")), ("beta", -1.0)):
        settings = {"neg_pos_ratio": 3.0, "beta": 1.0, name: bad}
        with pytest.raises(Exception, match=f"{name} must be positive and finite"):
            compiled(confidence, locations, labels, gt, settings["neg_pos_ratio"], settings["beta"], 5.0)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_with_a_clear_error(device):
    # Before, the second backward failed inside autograd with "no autograd
    # formula was registered" for multibox.backward.default.
    confidence, locations, labels, gt = _small(device)
    conf = confidence.detach().requires_grad_()
    loc = locations.detach().requires_grad_()
    reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    # create_graph=True alone is fine: the first-order gradients are the usual ones.
    d_conf, d_loc = torch.autograd.grad(reg + cls, (conf, loc), create_graph=True)
    reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    want_conf, want_loc = torch.autograd.grad(reg + cls, (conf, loc))
    assert torch.equal(d_conf.detach(), want_conf) and torch.equal(d_loc.detach(), want_loc)
    # Differentiating those gradients is not.
    penalty = d_conf.square().sum() + d_loc.square().sum()
    with pytest.raises(RuntimeError, match=r"multibox_loss does not support double backward \(create_graph=True"):
        penalty.backward()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_func_transforms_are_as_the_readme_says():
    # README, "PyTorch": not supported, with an error where a transform
    # would otherwise give a wrong answer. If a PyTorch release changes any of
    # this, the README's sentence must change with it.
    import torch.autograd.forward_ad as fwAD

    confidence, locations, labels, gt = _small("cpu")

    def total(conf):
        reg, cls, _ = multibox_loss(conf, locations, labels, gt)
        return reg + cls

    # grad, vjp, jacrev: refused in the package's words (PyTorch's own error
    # speaks of an autograd.Function the caller never wrote).
    for transform in (torch.func.grad, torch.func.jacrev, lambda f: lambda x: torch.func.vjp(f, x)):
        with pytest.raises(NotImplementedError, match="does not support torch.func.grad, vjp or jacrev"):
            transform(total)(confidence)
    # jvp and forward_ad: no forward-mode formula, so an error (before, the
    # tangent came back 0 without one, where autograd's directional
    # derivative is not). A tangent on gt_locations alone is right as 0.
    tangent = torch.randn_like(confidence)
    with pytest.raises(NotImplementedError, match="multibox_loss has no forward-mode derivative, and confidence"):
        torch.func.jvp(total, (confidence,), (tangent,))
    with fwAD.dual_level():
        dual = fwAD.make_dual(locations, torch.randn_like(locations))
        with pytest.raises(NotImplementedError, match="and predicted_locations carries a tangent"):
            multibox_loss(confidence, dual, labels, gt)
        reg, _, _ = multibox_loss(confidence, locations, labels, fwAD.make_dual(gt, torch.randn_like(gt)))
        assert fwAD.unpack_dual(reg).tangent is None
    # vmap: PyTorch's per-sample fallback, with the per-sample values.
    batch = torch.stack([confidence, confidence * 2])
    assert torch.equal(torch.func.vmap(total)(batch), torch.stack([total(confidence), total(confidence * 2)]))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_autograd_on_the_plain_pytorch_reference(device):
    # The kernels have no float64 path, so gradcheck's float64 finite
    # differences cannot run on them. Instead torch.autograd through the
    # plain-PyTorch reference (float64, same mining) gives the gradient our
    # backward must return, for arbitrary upstream values.
    for layout, (confidence, locations, labels, gt) in _layouts(device).items():
        c1 = confidence.detach().requires_grad_()
        l1 = locations.detach().requires_grad_()
        reg, cls, _ = multibox_loss(c1, l1, labels, gt, 3.0)
        (0.75 * reg + 2.5 * cls).backward()
        c2 = confidence.detach().double().requires_grad_()
        l2 = locations.detach().double().requires_grad_()
        r_reg, r_cls, _ = torch_reference(c2, l2, labels, gt, 3.0)
        (0.75 * r_reg + 2.5 * r_cls).backward()
        assert torch.allclose(reg.double(), r_reg, rtol=1e-5), layout
        assert torch.allclose(cls.double(), r_cls, rtol=1e-5), layout
        assert torch.allclose(c1.grad.double(), c2.grad, rtol=1e-4, atol=1e-6), layout
        assert torch.allclose(l1.grad.double(), l2.grad, rtol=1e-4, atol=1e-6), layout


@pytest.mark.filterwarnings("ignore:Input #[01] requires gradient and is not a double")
def test_gradcheck_f32_finite_differences():
    # gradcheck on the op itself in float32 with loose tolerances: an input
    # whose mining is stable under eps (background losses far apart, no
    # |pred - gt| near beta), so the loss is smooth where it is probed.
    b, p = 1, 6
    confidence = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                [1.5, 0.0, 0.0], [-2.0, 0.0, 1.0]]])
    labels = torch.tensor([[0, 1, 0, 0, 0, 2]])
    locations = torch.tensor([[[0.1, -0.2, 2.0, 0.3]] * p])
    gt = torch.zeros(b, p, 4)

    def f(conf, loc):
        reg, cls, _ = multibox_loss(conf, loc, labels, gt, 1.0)
        return reg, cls

    assert torch.autograd.gradcheck(
        f,
        (confidence.requires_grad_(), locations.requires_grad_()),
        eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=False,
    )


def _fused_reference_gradients(confidence, locations, labels, gt, g_reg, g_cls):
    """The crate's CPU reference in one forward_backward call with the
    upstream gradients given: f64 arithmetic, each gradient rounded once."""
    lib = _capi.library()
    b, p, c = confidence.shape
    grad_confidence = torch.empty_like(confidence)
    grad_locations = torch.empty_like(locations)
    call = multibox_torch._host_call(
        b, p, c, confidence, locations, labels, gt, upstream=(g_reg, g_cls), grads=(grad_confidence, grad_locations)
    )
    losses = _capi.Losses()
    config = lib.config(3.0, 0, 1.0)
    lib.call("multibox_reference_forward_backward_f32", _capi.ctypes.byref(config), _capi.ctypes.byref(call),
             _capi.ctypes.byref(losses))
    return grad_confidence, grad_locations


def test_cpu_gradients_are_rounded_once():
    # Scaling upstream-1 gradients afterwards (the op's old backward) rounds
    # twice; the reference scales in f64 and rounds once. Bit for bit.
    confidence, locations, labels, gt = _small("cpu", seed=3)
    g_reg, g_cls = 0.3, 1.7
    conf = confidence.clone().requires_grad_()
    loc = locations.clone().requires_grad_()
    reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    (g_reg * reg + g_cls * cls).backward()
    want_conf, want_loc = _fused_reference_gradients(confidence, locations, labels, gt, g_reg, g_cls)
    assert torch.equal(conf.grad, want_conf)
    assert torch.equal(loc.grad, want_loc)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backward_equals_the_fused_kernels_bit_for_bit(dtype):
    # multibox::backward (kernel 3, upstream from device memory) against the
    # fused forward_backward with the same upstream from the host: one
    # rounding each, so identical bits.
    confidence, locations, labels, gt = _small("cuda", dtype, seed=4, p=3000, c=21)
    g_reg, g_cls = 0.3, 1.7
    conf = confidence.clone().requires_grad_()
    loc = locations.clone().requires_grad_()
    reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    (g_reg * reg + g_cls * cls).backward()
    b, p, c = confidence.shape
    lib = _capi.library()
    workspace = torch.empty(lib.workspace_bytes(b, p, c), dtype=torch.uint8, device="cuda")
    want_conf = torch.empty_like(confidence)
    want_loc = torch.empty_like(locations)
    outs = [torch.empty((), dtype=torch.float32, device="cuda") for _ in range(2)]
    num_pos = torch.empty((), dtype=torch.int32, device="cuda")
    call = multibox_torch._device_call(
        b, p, c, confidence, locations, labels, gt, workspace,
        grad_confidence=want_conf.data_ptr(), grad_locations=want_loc.data_ptr(),
        regression_loss=outs[0].data_ptr(), classification_loss=outs[1].data_ptr(), num_pos=num_pos.data_ptr(),
    )
    call.g_reg, call.g_cls = g_reg, g_cls
    multibox_torch._launch("multibox_forward_backward", confidence.device, (3.0, 0, 1.0), call)
    assert torch.equal(conf.grad, want_conf)
    assert torch.equal(loc.grad, want_loc)
    assert torch.equal(reg, outs[0]) and torch.equal(cls, outs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_no_gradient_sized_tensor(device):
    # Every tensor autograd saves between forward and backward is one of the
    # caller's inputs (the same storage, no copy, even for non-contiguous
    # inputs) or the workspace (a few bytes per prior); no [B, P, C] tensor.
    confidence, locations, labels, gt = _layouts(device)["transposed"]
    conf = confidence.detach().requires_grad_()
    loc = locations.detach().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    b, p, c = confidence.shape
    inputs = {(t.data_ptr(), t.shape, t.stride()) for t in (conf, loc, labels, gt)}
    # On the CPU, the workspace is the divisor the forward read: one float32.
    workspace_bytes = _capi.library().workspace_bytes(b, p, c) if device == "cuda" else 4
    new = [t for t in saved if (t.data_ptr(), t.shape, t.stride()) not in inputs]
    assert [tuple(t.shape) for t in new] == [(workspace_bytes,)], [tuple(t.shape) for t in saved]
    assert sum(t.numel() * t.element_size() for t in new) <= max(workspace_bytes, 0)
    assert workspace_bytes < b * p * c * confidence.element_size()
    (reg + cls).backward()
    assert conf.grad is not None and loc.grad is not None


@needs_gpu
def test_cuda_memory_between_forward_and_backward_is_the_workspace():
    confidence, locations, labels, gt = _small("cuda", torch.bfloat16, p=8732, c=81, b=4)
    conf = confidence.clone().requires_grad_()
    loc = locations.clone().requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    reg, cls, _ = multibox_loss(conf, loc, labels, gt)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    b, p, c = confidence.shape
    # The workspace (~B*P*4 bytes) and three scalars, in 512-byte blocks.
    assert held <= _capi.library().workspace_bytes(b, p, c) + 4 * 512, held
    (reg + cls).backward()


@needs_gpu
def test_runs_on_the_current_stream_without_synchronising():
    confidence, locations, labels, gt = _small("cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        reg, cls, num_pos = multibox_loss(confidence, locations, labels, gt)
    stream.synchronize()
    want_reg, want_cls, _ = torch_reference(confidence, locations, labels, gt, 3.0)
    assert torch.allclose(reg.double(), want_reg, rtol=1e-5)
    assert torch.allclose(cls.double(), want_cls, rtol=1e-5)


# --- bad input -------------------------------------------------------------


def test_shapes_and_dtypes_are_checked():
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(Exception, match="predicted_locations"):
        multibox_loss(confidence, locations[:, :10], labels, gt)
    with pytest.raises(Exception, match="labels must be int64 or int32"):
        multibox_loss(confidence, locations, labels.float(), gt)
    with pytest.raises(Exception, match="gt_locations must be a floating-point tensor"):
        multibox_loss(confidence, locations, labels, gt.to(torch.int64))
    with pytest.raises(Exception, match="only float32 is supported"):
        multibox_loss(confidence.half(), locations.half(), labels, gt)
    # Before, float64 on the CPU was told "must be f32, f16 or bf16", the
    # CUDA kernels' dtypes, which the CPU reference does not take.
    with pytest.raises(Exception, match="on the CPU .* only float32 is supported, got torch.float64") as e:
        multibox_loss(confidence.double(), locations.double(), labels, gt)
    assert "f16" not in str(e.value)


def test_bad_dtypes_raise_type_error_and_bad_shapes_or_devices_value_error():
    # As the settings' checks do (and Python's convention); before, all of
    # these were RuntimeErrors from torch._check. Neither TypeError nor
    # ValueError is a RuntimeError.
    confidence, locations, labels, gt = _small("cpu")
    for args in (
        (confidence, locations, labels.float(), gt),
        (confidence, locations, labels, gt.to(torch.int64)),
        (confidence.double(), locations.double(), labels, gt),
        (confidence, locations.double(), labels, gt),
    ):
        with pytest.raises(TypeError, match="^multibox_loss: "):
            multibox_loss(*args)
    for args in (
        (confidence, locations[:, :10], labels, gt),
        (confidence[0], locations, labels, gt),
        (confidence, locations, labels[:, :3], gt),
        (confidence, locations, labels.to("meta"), gt),
    ):
        with pytest.raises(ValueError, match="^multibox_loss: "):
            multibox_loss(*args)
    # The smallest shape SPEC.md allows, on the CPU and in shape inference
    # alike (before: a MultiboxError from the library, and no error on meta).
    for device in ("cpu", "meta"):
        for (b, p, c), text in (((0, 5, 3), "B >= 1"), ((2, 0, 3), "P >= 1"), ((2, 5, 1), "C >= 2")):
            args = (torch.zeros(b, p, c), torch.zeros(b, p, 4), torch.zeros(b, p, dtype=torch.int64),
                    torch.zeros(b, p, 4))
            with pytest.raises(ValueError, match=f"^multibox_loss: needs {text}"):
                multibox_loss(*(t.to(device) for t in args))
    # Not a tensor at all (before: AttributeError: 'list' object has no
    # attribute 'device').
    with pytest.raises(TypeError, match="^multibox_loss: confidence must be a Tensor, got list"):
        multibox_loss(confidence.tolist(), locations, labels, gt)
    # The op itself checks its normaliser tensor the same way.
    settings = (3.0, 0, 1.0, _capi.ROW_MAJOR, _capi.NORMALIZE_GIVEN, 0.0)
    with pytest.raises(ValueError, match="^multibox_loss: the normalizer tensor must hold one element"):
        _forward_op(confidence, locations, labels, gt, *settings, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="^multibox_loss: the normalizer tensor must be real numbers"):
        _forward_op(confidence, locations, labels, gt, *settings, torch.tensor(True))


def test_tensors_on_different_devices_are_refused():
    # Before, labels or gt_locations on another device than confidence gave
    # uninitialised losses; now the call is refused before anything runs.
    # The meta device stands in for a second device on a machine without a GPU.
    confidence, locations, labels, gt = _small("cpu")
    for i, name in enumerate(["predicted_locations", "labels", "gt_locations"]):
        args = [confidence, locations, labels, gt]
        args[i + 1] = args[i + 1].to("meta")
        with pytest.raises(Exception, match="must be on one device"):
            multibox_loss(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_tensors_give_the_outputs_shapes(dtype):
    # Shape inference with no data (a model built on the meta device, say).
    # Before, the device check refused them: "runs on CUDA and CPU tensors,
    # got meta". Any of the CUDA kernels' dtypes, as the device is unknown.
    confidence, locations, labels, gt = (t.to("meta") for t in _small("cpu", b=3, p=16, c=7))
    for layout, (conf, loc, g) in (
        ("row_major", (confidence, locations, gt)),
        ("channel_major", (confidence.transpose(1, 2), locations.transpose(1, 2), gt.transpose(1, 2))),
    ):
        conf = conf.to(dtype).requires_grad_()
        loc = loc.to(dtype).requires_grad_()
        reg, cls, num_pos = multibox_loss(conf, loc, labels, g, layout=layout)
        for t, want in ((reg, torch.float32), (cls, torch.float32), (num_pos, torch.int32)):
            assert t.device.type == "meta" and t.shape == () and t.dtype == want, layout
        (reg + cls).backward()
        for x in (conf, loc):
            assert x.grad.device.type == "meta" and x.grad.shape == x.shape and x.grad.dtype == dtype, layout
    # The module too, and the checks still apply.
    criterion = multibox_torch.MultiboxLoss(torch.zeros(16, 4), 0.5, 3, 0.1, 0.2, "meta")
    reg, cls = criterion(confidence.to(dtype), locations.to(dtype), labels, gt)
    assert reg.device.type == "meta" and cls.shape == ()
    # No values, so no status: a clear error, not "Cannot copy out of meta tensor".
    with pytest.raises(RuntimeError, match="last_status\\(\\): the last loss ran on meta tensors"):
        criterion.last_status()
    boxes, box_labels = torch.zeros(1, 2, 4, device="meta"), torch.ones(1, 2, dtype=torch.int64, device="meta")
    labels_out, _ = criterion.assign(boxes, box_labels, torch.ones(1, dtype=torch.int64, device="meta"))
    assert labels_out.device.type == "meta" and labels_out.shape == (1, 16)
    with pytest.raises(RuntimeError, match="last_assign_status\\(\\): the last assignment ran on meta tensors"):
        criterion.last_assign_status()
    with pytest.raises(ValueError, match="labels must be \\[3, 16\\]"):
        multibox_loss(confidence, locations, labels[:, :4], gt)


@needs_gpu
def test_cuda_and_cpu_tensors_together_are_refused():
    confidence, locations, labels, gt = _small("cuda")
    with pytest.raises(Exception, match="must be on one device"):
        multibox_loss(confidence, locations, labels.cpu(), gt)
    with pytest.raises(Exception, match="must be on one device"):
        multibox_loss(confidence.cpu(), locations.cpu(), labels, gt.cpu())


@pytest.mark.parametrize("value", [-1, 2**32, 2**40])
def test_min_negatives_out_of_range_is_refused(value):
    # Before, ctypes' uint32 wrapped -1 to 4294967295 and 2**32 to 0.
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(ValueError, match="min_negatives_per_image must be in 0..2\\*\\*32-1"):
        multibox_loss(confidence, locations, labels, gt, min_negatives_per_image=value)


def test_min_negatives_must_be_an_integer_and_the_edges_work():
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(TypeError, match="min_negatives_per_image must be an integer"):
        multibox_loss(confidence, locations, labels, gt, min_negatives_per_image=2.5)
    for value in (0, 2**32 - 1):
        _, _, num_pos = multibox_loss(confidence, locations, labels, gt, min_negatives_per_image=value)
        assert int(num_pos) == int((labels > 0).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_a_fractional_ratio_mines_its_floor(device):
    """Ratio 2.5 and 3 positives mine floor(7.5) = 7 negatives (SPEC.md),
    not the reference code's 8 (``orders < num_neg`` against 7.5)."""
    p, c = 12, 3
    confidence = torch.zeros(1, p, c)
    confidence[0, 3:, 0] = -torch.arange(1, p - 2, dtype=torch.float32)  # distinct background losses
    labels = torch.zeros(1, p, dtype=torch.int64)
    labels[0, :3] = 1
    locations, gt = torch.zeros(1, p, 4), torch.zeros(1, p, 4)
    ce = torch.logsumexp(confidence[0], dim=1) - confidence[0, torch.arange(p), labels[0]]
    negatives = ce[3:].sort(descending=True).values

    def expected(k):
        return ((ce[:3].sum() + negatives[:k].sum()) / 3).item()

    assert abs(expected(7) - expected(8)) > 1e-3
    _, cls, _ = multibox_loss(*(t.to(device) for t in (confidence, locations, labels, gt)), neg_pos_ratio=2.5)
    assert cls.item() == pytest.approx(expected(7), rel=1e-6)


@pytest.mark.parametrize("name", ["neg_pos_ratio", "beta"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 1e39])
def test_ratio_and_beta_must_be_positive_and_finite(name, value):
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(ValueError, match=f"{name} must be positive and finite"):
        multibox_loss(confidence, locations, labels, gt, **{name: value})


@pytest.mark.parametrize("name", ["neg_pos_ratio", "beta"])
@pytest.mark.parametrize("value", [1e-46, 1e-50, 2.0**-150])
def test_ratio_and_beta_that_round_to_0_in_float32_are_refused(name, value):
    # Before, they passed the Python check (> 0) and the library refused
    # the float32 they became: "beta must be a positive finite number, got 0".
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(ValueError, match=f"multibox_loss: {name} {value!r} rounds to 0 in float32"):
        multibox_loss(confidence, locations, labels, gt, **{name: value})
    # The smallest float32 (what anything above 2**-150 rounds to) is taken.
    reg, cls, _ = multibox_loss(confidence, locations, labels, gt, **{name: 2.0**-150 * 1.0000001})
    assert torch.isfinite(reg) and torch.isfinite(cls)


def test_numpy_settings_are_taken_and_other_types_refused():
    # Before, np.float32(3.0) (a config read with numpy) was refused as
    # "not a real number": the check took Python's int and float only.
    np = pytest.importorskip("numpy")
    confidence, locations, labels, gt = _small("cpu")
    want = multibox_loss(confidence, locations, labels, gt, neg_pos_ratio=2.5, beta=0.5)
    for ratio, beta in ((np.float32(2.5), np.float64(0.5)), (np.float16(2.5), np.float32(0.5))):
        got = multibox_loss(confidence, locations, labels, gt, neg_pos_ratio=ratio, beta=beta)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    _, _, num_pos = multibox_loss(confidence, locations, labels, gt, neg_pos_ratio=np.int64(2))
    assert int(num_pos) == int((labels > 0).sum())
    for name in ("neg_pos_ratio", "beta"):
        for bad in (True, np.bool_(True), "3", torch.tensor(3.0)):
            with pytest.raises(TypeError, match=f"{name} must be a real number"):
                multibox_loss(confidence, locations, labels, gt, **{name: bad})


def test_invalid_label_message_names_the_valid_classes():
    # C = 5: the classes are 1..4 (the message used to say 1..5).
    confidence, locations, labels, gt = _small("cpu", c=5)
    bad = labels.clone()
    bad[0, 0] = 5
    with pytest.raises(multibox_torch.MultiboxError, match="label 5 .* a class from 1 to 4 \\(C = 5"):
        multibox_loss(confidence, locations, bad, gt)


def test_only_gt_locations_requiring_grad_gets_a_zero_gradient():
    # SPEC.md: no gradient flows to gt_locations. Before, backward raised
    # "backward of a call made with need_grad=False".
    confidence, locations, labels, gt = _small("cpu")
    gt = gt.clone().requires_grad_()
    reg, cls, _ = multibox_loss(confidence, locations, labels, gt)
    (reg + cls).backward()
    assert torch.equal(gt.grad, torch.zeros_like(gt))
    # With the predictions too: theirs as usual, gt's still zero.
    loc = locations.clone().requires_grad_()
    gt.grad = None
    reg, cls, _ = multibox_loss(confidence, loc, labels, gt)
    (reg + cls).backward()
    assert loc.grad.abs().sum() > 0 and torch.equal(gt.grad, torch.zeros_like(gt))


def test_cpu_autocast_casts_to_float32():
    # Before, CPU autocast to bf16 was refused ("only float32 is supported").
    confidence, locations, labels, gt = _small("cpu")
    head = torch.nn.Linear(5, 5)
    torch.nn.init.eye_(head.weight)
    torch.nn.init.zeros_(head.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(confidence)
        assert logits.dtype == torch.bfloat16
        reg, cls, num_pos = multibox_loss(logits, locations.bfloat16(), labels, gt)
    (reg + cls).backward()
    want_reg, want_cls, want_n = multibox_loss(logits.detach().float(), locations.bfloat16().float(), labels, gt)
    assert torch.equal(reg, want_reg) and torch.equal(cls, want_cls) and torch.equal(num_pos, want_n)
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32


# --- the package -------------------------------------------------------------

# Installed with pip: the library is bundled next to the package. Otherwise
# (scripts/gpu-check: PYTHONPATH=python, MULTIBOX_LIB=the carried library)
# the tests of the installation itself do not apply.
PACKAGE_DIR = Path(multibox_torch.__file__).resolve().parent
INSTALLED = _capi._bundled(PACKAGE_DIR) is not None
needs_install = pytest.mark.skipif(not INSTALLED, reason="multibox_torch is not pip-installed here")


def _clean_env():
    drop = ("MULTIBOX_LIB", "PYTHONPATH") if INSTALLED else ("MULTIBOX_LIB",)
    return {k: v for k, v in os.environ.items() if k not in drop}


@needs_install
def test_imports_from_any_directory_without_environment_variables(tmp_path):
    code = (
        "import multibox_torch, torch\n"
        "c = torch.zeros(1, 3, 2); l = torch.zeros(1, 3, 4)\n"
        "r, k, n = multibox_torch.multibox_loss(c, l, torch.tensor([[1, 0, 0]]), l)\n"
        "print(multibox_torch.library_path(), int(n))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path, n = out.stdout.split()
    assert Path(path).parent == Path(multibox_torch.__file__).parent, "the bundled library is loaded"
    assert n == "1"


def test_a_wrong_multibox_lib_names_the_variable_and_the_path(tmp_path):
    missing = tmp_path / "no" / "libmultibox.so"
    code = "import multibox_torch; multibox_torch.library_path()"
    env = dict(_clean_env(), MULTIBOX_LIB=str(missing))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "MULTIBOX_LIB" in out.stderr and str(missing) in out.stderr, out.stderr
    # A file that is not a library: the loader's error, with the variable.
    junk = tmp_path / "junk.so"
    junk.write_text("not a library")
    env["MULTIBOX_LIB"] = str(junk)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "MULTIBOX_LIB" in out.stderr and str(junk) in out.stderr, out.stderr


def test_setup_outside_a_checkout_says_so_before_fetching_nvrtc(tmp_path):
    # setup.py alone, as in an sdist of python/: no ../Cargo.toml and no
    # ../scripts/setup. Before, it ran scripts/setup first and reported
    # "could not install NVRTC" instead of asking for a checkout. Stubs of
    # setuptools and setuptools_rust (next to setup.py, so they come first
    # on the path) make this independent of what is installed: setup.py
    # must stop before it uses either.
    package = tmp_path / "python"
    package.mkdir()
    shutil.copy(ROOT / "python" / "setup.py", package)
    (package / "setuptools.py").write_text("def setup(**kwargs):\n    raise SystemExit('setup() was reached')\n")
    (package / "setuptools_rust.py").write_text("Binding = RustExtension = None\n")
    drop = ("MULTIBOX_NVRTC", "MULTIBOX_SKIP_KERNELS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=package, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "Build from a checkout" in out.stderr and "NVRTC" not in out.stderr, out.stderr


def test_the_version_follows_the_crate():
    manifest = (ROOT / "Cargo.toml").read_text()
    crate = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', manifest, re.M | re.S).group(1)
    assert _capi.library().version() == crate
    if INSTALLED:
        assert multibox_torch.__version__ == crate


def test_the_installed_wheel_serves_every_python_3():
    """pip's wheel is tagged py3-none-<platform> (setup.py's library_wheel):
    the bundled library links no Python, so one wheel serves every Python 3
    on its platform. Checked on the installed package (scripts/python-tests
    installs it); skipped for a checkout imported from PYTHONPATH."""
    from importlib import metadata

    try:
        dist = metadata.distribution("multibox-torch")
    except metadata.PackageNotFoundError:
        pytest.skip("multibox-torch is not installed")
    package = Path(multibox_torch.__file__).resolve().parent
    if not (Path(dist.locate_file("multibox_torch")).resolve() == package):
        pytest.skip(f"multibox_torch is imported from {package}, not from the installed package")
    wheel = dist.read_text("WHEEL")
    if wheel is None:
        pytest.skip("installed without a wheel's metadata")
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert tags and all(tag.startswith("py3-none-") for tag in tags), tags
