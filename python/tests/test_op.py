"""The PyTorch op against a plain-PyTorch reference on the golden cases,
torch.library.opcheck, and the autograd formula. Needs PyTorch and a CUDA
GPU (the CPU path, f32 through the crate's reference, is checked too).

    MULTIBOX_LIB=target/release/libmultibox.so python3 -m pytest -q python/tests/test_op.py
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
import multibox_torch  # noqa: E402
from multibox_torch import _loss_op, multibox_loss  # noqa: E402

GOLDENS = ROOT / "tests" / "goldens"
CASES = sorted(p.name for p in GOLDENS.iterdir() if (p / "case.json").exists())
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Relative tolerances: losses against the f64 expectation, gradients against
# the largest gradient magnitude (one rounding to the storage type).
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _array(case, name, meta_name, dtype):
    raw = bytearray((GOLDENS / case / f"{name}.bin").read_bytes())
    shape = json.loads((GOLDENS / case / "case.json").read_text())["files"][meta_name]["shape"]
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


def load(case, device):
    meta = json.loads((GOLDENS / case / "case.json").read_text())
    dtype = DTYPES[meta["input_dtype"]]
    label_dtype = torch.int64 if meta["label_dtype"] == "i64" else torch.int32
    t = {
        "confidence": _array(case, "confidence", "confidence", torch.float32).to(dtype),
        "locations": _array(case, "locations", "locations", torch.float32).to(dtype),
        "labels": _array(case, "labels", "labels", label_dtype),
        "gt_locations": _array(case, "gt_locations", "gt_locations", torch.float32).to(dtype),
        "mask": _array(case, "mask", "mask", torch.uint8).bool(),
        "grad_confidence": _array(case, "grad_confidence", "grad_confidence", torch.float32),
        "grad_locations": _array(case, "grad_locations", "grad_locations", torch.float32),
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


@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    meta, t = load(case, "cuda")
    dtype = t["confidence"].dtype
    confidence = t["confidence"].clone().requires_grad_()
    locations = t["locations"].clone().requires_grad_()
    reg, cls, num_pos = multibox_loss(confidence, locations, t["labels"], t["gt_locations"], meta["neg_pos_ratio"])
    (reg + cls).backward()
    assert int(num_pos) == meta["num_pos"]
    for got, want in [(reg, meta["regression_loss"]), (cls, meta["classification_loss"])]:
        assert abs(float(got) - want) <= LOSS_RTOL[dtype] * max(abs(want), 1e-30), (float(got), want)
    for got, want in [(confidence.grad, t["grad_confidence"]), (locations.grad, t["grad_locations"])]:
        scale = want.abs().max().clamp(min=1e-30)
        err = ((got.float() - want).abs().max() / scale).item()
        assert err <= GRAD_TOL[dtype], err
    # The plain-PyTorch reference agrees with the golden numbers too.
    r_reg, r_cls, r_mask = torch_reference(
        t["confidence"], t["locations"], t["labels"], t["gt_locations"], meta["neg_pos_ratio"]
    )
    assert abs(r_reg.item() - meta["regression_loss"]) <= 1e-9 * max(abs(meta["regression_loss"]), 1.0)
    assert abs(r_cls.item() - meta["classification_loss"]) <= 1e-6 * max(abs(meta["classification_loss"]), 1.0)


def _small(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, p, c = 2, 64, 5
    confidence = (torch.randn(b, p, c, generator=g) * 2).to(device, dtype)
    locations = torch.randn(b, p, 4, generator=g).to(device, dtype)
    gt = torch.randn(b, p, 4, generator=g).to(device, dtype)
    labels = torch.randint(0, c, (b, p), generator=g)
    labels[torch.rand(b, p, generator=g) < 0.6] = 0
    labels[0, 3] = -1
    return confidence, locations, labels.to(device), gt


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_opcheck(device):
    confidence, locations, labels, gt = _small(device)
    for need_grad in (True, False):
        args = (confidence.requires_grad_(need_grad), locations.requires_grad_(need_grad), labels, gt, 3.0, 0, 1.0, need_grad)
        torch.library.opcheck(_loss_op, args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_autograd_formula_matches_torch_autograd_on_the_reference(device):
    # Our kernels have no float64 path, so gradcheck's float64 finite
    # differences cannot run on them. Instead: (1) torch.autograd through
    # the plain-PyTorch reference (float64) with the same mining gives the
    # gradient our backward must return, for arbitrary upstream values;
    confidence, locations, labels, gt = _small(device)
    c1 = confidence.clone().requires_grad_()
    l1 = locations.clone().requires_grad_()
    reg, cls, _ = multibox_loss(c1, l1, labels, gt, 3.0)
    (0.75 * reg + 2.5 * cls).backward()
    c2 = confidence.double().requires_grad_()
    l2 = locations.double().requires_grad_()
    r_reg, r_cls, _ = torch_reference(c2, l2, labels, gt, 3.0)
    (0.75 * r_reg + 2.5 * r_cls).backward()
    assert torch.allclose(reg.double(), r_reg, rtol=1e-5) and torch.allclose(cls.double(), r_cls, rtol=1e-5)
    assert torch.allclose(c1.grad.double(), c2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(l1.grad.double(), l2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_gradcheck_f32_finite_differences(device):
    # (2) gradcheck on the op itself in float32 with loose tolerances: an
    # input whose mining is stable under eps (background losses far apart,
    # no |pred - gt| near beta), so the loss is smooth where it is probed.
    b, p, c = 1, 6, 3
    confidence = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                [1.5, 0.0, 0.0], [-2.0, 0.0, 1.0]]], device=device)
    labels = torch.tensor([[0, 1, 0, 0, 0, 2]], device=device)
    locations = torch.tensor([[[0.1, -0.2, 2.0, 0.3]] * p], device=device)
    gt = torch.zeros(b, p, 4, device=device)

    def f(conf, loc):
        reg, cls, _ = multibox_loss(conf, loc, labels, gt, 1.0)
        return reg, cls

    assert torch.autograd.gradcheck(
        f,
        (confidence.requires_grad_(), locations.requires_grad_()),
        eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=False,
    )


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


def test_bad_input_raises():
    confidence, locations, labels, gt = _small("cpu")
    with pytest.raises(Exception, match="predicted_locations"):
        multibox_loss(confidence, locations[:, :10], labels, gt)
    with pytest.raises(Exception, match="labels"):
        multibox_loss(confidence, locations, labels.float(), gt)
    bad = labels.clone()
    bad[0, 0] = 99
    with pytest.raises(multibox_torch._capi.MultiboxError, match="label 99"):
        multibox_loss(confidence, locations, bad, gt)
