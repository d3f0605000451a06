"""Target assignment and the drop-in MultiboxLoss in PyTorch: every target
golden case through ``assign_targets`` (CPU tensors, the crate's CPU
reference; CUDA too when there is a GPU), the pad helper, the standard
priors, ``torch.library.opcheck``, and the module against the reference
algorithm's losses. Skips when PyTorch is not installed.

    cargo build --lib && python3 -m pytest -q python/tests/test_targets.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
import multibox_torch  # noqa: E402
from multibox_torch import MultiboxLoss, assign_targets, pad_targets, standard_priors  # noqa: E402
from multibox_torch.targets import _assign_op  # noqa: E402

COMMITTED = ROOT / "tests" / "goldens-targets"
GOLDENS = Path(os.environ.get("MULTIBOX_TARGET_GOLDENS", COMMITTED))
CASES = (json.loads((GOLDENS / "cases.json").read_text()) if (GOLDENS / "cases.json").exists()
         else sorted(p.name for p in GOLDENS.iterdir() if (p / "case.json").exists()))
assert CASES, f"no target golden case in {GOLDENS}"  # an empty parameter list would only skip
_DT = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def load(name, folder=None):
    """A case of the goldens folder (the committed one for the named cases
    the other tests use)."""
    d = (folder or GOLDENS) / name
    meta = json.loads((d / "case.json").read_text())
    arrays = {}
    for file, spec in meta["files"].items():
        data = bytearray((d / file).read_bytes())
        arrays[file[: -len(".bin")]] = torch.frombuffer(data, dtype=_DT[spec["dtype"]]).reshape(spec["shape"])
    return meta, arrays


def settings(meta):
    return dict(
        iou_threshold=meta["iou_threshold"],
        center_variance=meta["center_variance"],
        size_variance=meta["size_variance"],
    )


def check_case(name, labels, gt_locations, arrays):
    assert labels.dtype == arrays["labels"].dtype, name
    assert torch.equal(labels.cpu(), arrays["labels"]), f"{name}: labels differ"
    want = arrays["gt_locations"]
    err = (gt_locations.cpu() - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6, f"{name}: offsets off by {err.max().item()}"


@pytest.mark.parametrize("name", CASES)
def test_cpu_matches_the_golden(name):
    meta, a = load(name)
    labels, gt_locations = assign_targets(a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"], **settings(meta))
    check_case(name, labels, gt_locations, a)


@needs_gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_matches_the_golden(name):
    meta, a = load(name)
    cuda = {k: v.cuda() for k, v in a.items()}
    labels, gt_locations = assign_targets(
        cuda["priors"], cuda["gt_boxes"], cuda["gt_labels"], cuda["gt_counts"], **settings(meta)
    )
    assert labels.is_cuda and gt_locations.is_cuda
    check_case(name, labels, gt_locations, a)


def test_random_goldens_script_writes_cases_the_op_meets(tmp_path):
    """scripts/random_goldens.py's target cases (labelled by the reference
    MatchPrior in float32 PyTorch, apart from the crate) through the op."""
    script = COMMITTED.parents[1] / "scripts" / "random_goldens.py"
    subprocess.run([sys.executable, str(script), "targets", str(tmp_path), "--seed", "5", "--count", "6"],
                   check=True, capture_output=True)
    names = sorted(p.name for p in tmp_path.iterdir() if (p / "case.json").exists())
    assert len(names) == 6
    for name in names:
        meta, a = load(name, tmp_path)
        labels, gt_locations = assign_targets(a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"],
                                              **settings(meta))
        check_case(name, labels, gt_locations, a)


def test_standard_priors_are_the_goldens():
    for name, priors in (("t_ssdlite_voc", "ssdlite300"), ("t_ssd300", "ssd300")):
        _, a = load(name, COMMITTED)
        assert torch.equal(standard_priors(priors), a["priors"]), name
    with pytest.raises(ValueError):
        standard_priors("ssd512")


def test_pad_targets():
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5]]), torch.zeros((0, 4)), torch.rand(3, 4)]
    labels = [torch.tensor([3]), torch.zeros((0,), dtype=torch.int64), torch.tensor([1, 2, 3])]
    gt_boxes, gt_labels, gt_counts = pad_targets(boxes, labels)
    assert gt_boxes.shape == (3, 3, 4) and gt_boxes.dtype == torch.float32
    assert gt_labels.shape == (3, 3) and gt_labels.dtype == torch.int64
    assert gt_counts.tolist() == [1, 0, 3] and gt_counts.dtype == torch.int32
    assert torch.equal(gt_boxes[2], boxes[2]) and torch.equal(gt_labels[2], labels[2])
    assert torch.equal(gt_boxes[0, 0], boxes[0][0]) and gt_labels[0].tolist() == [3, 0, 0]
    assert not gt_boxes[0, 1:].any() and not gt_boxes[1].any() and not gt_labels[1].any()
    # Other float and integer types are converted: float32 boxes, and the
    # first image's label type.
    gb, gl, _ = pad_targets([boxes[0].double(), boxes[2].half()], [labels[0].int(), labels[2]])
    assert gb.dtype == torch.float32 and gl.dtype == torch.int32
    assert torch.equal(gb[1], boxes[2].half().float()) and gl.tolist() == [[3, 0, 0], [1, 2, 3]]
    assert pad_targets(boxes, labels, max_boxes=8)[0].shape == (3, 8, 4)
    # Every image empty: one padding row, count 0.
    gb, gl, gc = pad_targets([torch.zeros((0, 4))], [torch.zeros((0,), dtype=torch.int32)])
    assert gb.shape == (1, 1, 4) and gl.dtype == torch.int32 and gc.tolist() == [0]
    with pytest.raises(ValueError, match="T must be at least 1"):
        pad_targets([torch.zeros((0, 4))], [torch.zeros((0,), dtype=torch.int32)], max_boxes=0)
    with pytest.raises(ValueError):
        pad_targets(boxes, labels, max_boxes=2)
    with pytest.raises(ValueError):
        pad_targets(boxes, labels[:2])
    with pytest.raises(ValueError, match="pad_targets: image 0's boxes must be \\[n, 4\\], got \\(3,\\)"):
        pad_targets([torch.zeros(3)], [torch.zeros(3, dtype=torch.int64)])
    # Types are TypeErrors, as assign_targets' are.
    with pytest.raises(TypeError, match="pad_targets: image 2's labels must be int64 or int32, got torch.float32"):
        pad_targets(boxes, labels[:2] + [labels[2].float()])
    with pytest.raises(TypeError, match="pad_targets: max_boxes must be None or an integer, got 3.5"):
        pad_targets(boxes, labels, max_boxes=3.5)
    with pytest.raises(TypeError, match="pad_targets: boxes\\[1\\] must be a Tensor, got list"):
        pad_targets([boxes[0], []], labels[:2])
    # torch.tensor([]) is an image without boxes too.
    gb, gl, gc = pad_targets([torch.tensor([]), boxes[0]], [torch.tensor([], dtype=torch.int64), labels[0]])
    assert gb.shape == (2, 1, 4) and gc.tolist() == [0, 1] and torch.equal(gb[1, 0], boxes[0][0])


def test_empty_image_and_bad_settings():
    priors = standard_priors("ssdlite300")
    gt_boxes, gt_labels, gt_counts = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.4, 0.5]]), torch.zeros((0, 4))],
        [torch.tensor([5]), torch.zeros((0,), dtype=torch.int64)],
    )
    labels, gt_locations = assign_targets(priors, gt_boxes, gt_labels, gt_counts)
    assert (labels[0] == 5).any() and (labels[1] == 0).all() and (gt_locations[1] == 0).all()
    settings = dict(iou_threshold=0.5, neg_pos_ratio=3, center_variance=0.1, size_variance=0.2)
    for name, value, within in (
        ("iou_threshold", 0.0, r"in \(0, 1\]"), ("iou_threshold", 1.5, r"in \(0, 1\]"),
        ("iou_threshold", math.nan, r"in \(0, 1\]"), ("center_variance", 0.0, "positive and finite"),
        ("size_variance", -1.0, "positive and finite"), ("size_variance", math.inf, "positive and finite"),
        ("center_variance", 1e-46, "positive and finite"), ("center_variance", 1e39, "positive and finite"),
    ):
        message = f"assign_targets: {name} must be {within}"
        with pytest.raises(ValueError, match=message):
            assign_targets(priors, gt_boxes, gt_labels, gt_counts, **{name: value})
        # When the module is made, not at its first step.
        with pytest.raises(ValueError, match=message):
            MultiboxLoss(priors, device="cpu", **{**settings, name: value})
    # A wrong dtype is a TypeError, a wrong shape or device a ValueError
    # (before, RuntimeErrors from torch._check; neither is one).
    with pytest.raises(TypeError, match="assign_targets: gt_labels must be int64 or int32, got torch.float32"):
        assign_targets(priors, gt_boxes, gt_labels.float(), gt_counts)
    with pytest.raises(ValueError, match="assign_targets: priors must be \\[P, 4\\], got \\(3000, 3\\)"):
        assign_targets(priors[:, :3], gt_boxes, gt_labels, gt_counts)
    with pytest.raises(ValueError, match="assign_targets: gt_counts must be \\[2\\], got \\(1,\\)"):
        assign_targets(priors, gt_boxes, gt_labels, gt_counts[:1])
    with pytest.raises(ValueError, match="assign_targets: gt_labels is on meta, gt_boxes on cpu"):
        assign_targets(priors, gt_boxes, gt_labels.to("meta"), gt_counts)
    for args, text in (((priors[:0], gt_boxes, gt_labels, gt_counts), "P >= 1"),
                       ((priors, gt_boxes[:0], gt_labels[:0], gt_counts[:0]), "B >= 1"),
                       ((priors, gt_boxes[:, :0], gt_labels[:, :0], gt_counts), "T >= 1")):
        with pytest.raises(ValueError, match=f"assign_targets: needs {text}"):
            assign_targets(*args)
    with pytest.raises(TypeError, match="assign_targets: priors must be a Tensor, got list"):
        assign_targets(priors.tolist(), gt_boxes, gt_labels, gt_counts)


def test_settings_take_numpy_scalars_and_refuse_other_types():
    # Before, float() took True as a threshold of 1.0 and "0.5" as 0.5, and
    # MultiboxLoss took any neg_pos_ratio until its first step.
    np = pytest.importorskip("numpy")
    _, a = load("t_ssdlite_voc", COMMITTED)
    args = (a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"])
    labels, gt_locations = assign_targets(*args, np.float32(0.5), np.float64(0.1), np.float32(0.2))
    check_case("t_ssdlite_voc", labels, gt_locations, a)
    for name in ("iou_threshold", "center_variance", "size_variance"):
        for bad in (True, "0.5", torch.tensor(0.5)):
            with pytest.raises(TypeError, match=f"{name} must be a real number"):
                assign_targets(*args, **{name: bad})
            settings = dict(iou_threshold=0.5, neg_pos_ratio=3, center_variance=0.1, size_variance=0.2)
            with pytest.raises(TypeError, match=f"{name} must be a real number"):
                MultiboxLoss(a["priors"], device="cpu", **{**settings, name: bad})
    settings = dict(iou_threshold=0.5, center_variance=0.1, size_variance=0.2, device="cpu")
    with pytest.raises(TypeError, match="neg_pos_ratio must be a real number"):
        MultiboxLoss(a["priors"], neg_pos_ratio=True, **settings)
    with pytest.raises(ValueError, match="neg_pos_ratio must be positive and finite"):
        MultiboxLoss(a["priors"], neg_pos_ratio=-3, **settings)
    criterion = MultiboxLoss(a["priors"], neg_pos_ratio=np.int64(3), **settings)
    labels, gt_locations = criterion.assign(a["gt_boxes"], a["gt_labels"], a["gt_counts"])
    check_case("t_ssdlite_voc", labels, gt_locations, a)


def test_targets_of_boxes_that_require_grad_are_constants_of_the_loss():
    # SPEC.md: no gradient flows to the targets. Boxes that require grad
    # (an augmentation written in PyTorch, say) made gt_locations require
    # grad too, and the loss's backward then raised "no autograd formula
    # was registered" for multibox::assign_targets.
    _, a = load("t_ssdlite_voc", COMMITTED)
    boxes = a["gt_boxes"].clone().requires_grad_()
    criterion = MultiboxLoss(a["priors"], 0.5, 3, 0.1, 0.2, "cpu")
    labels, gt_locations = criterion.assign(boxes, a["gt_labels"], a["gt_counts"])
    assert not labels.requires_grad and not gt_locations.requires_grad
    check_case("t_ssdlite_voc", labels, gt_locations, a)
    b, p = labels.shape
    confidence = torch.randn((b, p, 21), requires_grad=True)
    predicted = torch.randn((b, p, 4), requires_grad=True)
    reg, cls = criterion(confidence, predicted, labels, gt_locations)
    (reg + cls).backward()
    assert confidence.grad is not None and boxes.grad is None
    compiled = torch.compile(lambda x: assign_targets(a["priors"], x, a["gt_labels"], a["gt_counts"])[1])
    assert not compiled(boxes).requires_grad


def test_wide_counts_are_clamped_not_wrapped():
    # gt_counts is read as int32. An int64 count of 2**32 + 1 used to wrap
    # to 1 (one box used, nothing recorded), and -(2**32) + 2 to a valid 2.
    _, a = load("t_ssdlite_voc", COMMITTED)
    t = a["gt_boxes"].shape[1]
    criterion = MultiboxLoss(a["priors"], 0.5, 3, 0.1, 0.2, "cpu")
    full = criterion.assign(a["gt_boxes"], a["gt_labels"], torch.full_like(a["gt_counts"], t, dtype=torch.int64))
    empty = criterion.assign(a["gt_boxes"], a["gt_labels"], torch.zeros_like(a["gt_counts"], dtype=torch.int64))
    for counts, want in (((2**32 + 1), full), ((t + 1), full), (-(2**32) + 2, empty), (-1, empty)):
        got = criterion.assign(a["gt_boxes"], a["gt_labels"], torch.full_like(a["gt_counts"], counts, dtype=torch.int64))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), counts
        assert criterion.last_assign_status().count_clamped, counts
    criterion.assign(a["gt_boxes"], a["gt_labels"], a["gt_counts"].to(torch.int64))
    assert not criterion.last_assign_status().count_clamped
    with pytest.raises(TypeError, match="gt_counts must be integers, got torch.bool"):
        assign_targets(a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"] > 0)


def test_meta_tensors_give_the_assignments_shapes():
    # Shape inference with no data, as for the loss (test_op.py).
    priors = standard_priors("ssdlite300")
    gt_boxes, gt_labels, gt_counts = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.4, 0.5]]), torch.zeros((0, 4))],
        [torch.tensor([5], dtype=torch.int32), torch.zeros((0,), dtype=torch.int32)],
    )
    meta = [t.to("meta") for t in (priors, gt_boxes, gt_labels, gt_counts)]
    labels, gt_locations = assign_targets(*meta)
    assert labels.device.type == "meta" and labels.shape == (2, 3000) and labels.dtype == torch.int32
    assert gt_locations.device.type == "meta" and gt_locations.shape == (2, 3000, 4)
    assert gt_locations.dtype == torch.float32
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "meta", layout="channel_major")
    labels, gt_locations = criterion.assign(*meta[1:])
    assert labels.shape == (2, 3000) and gt_locations.shape == (2, 4, 3000)
    assert gt_locations.device.type == "meta"
    # Padding on the meta device: all three outputs there, as for CUDA.
    padded = pad_targets(
        [torch.empty((2, 4), device="meta"), torch.empty((0, 4), device="meta")],
        [torch.empty(2, dtype=torch.int64, device="meta"), torch.empty(0, dtype=torch.int64, device="meta")],
    )
    assert [t.device.type for t in padded] == ["meta"] * 3
    assert [tuple(t.shape) for t in padded] == [(2, 2, 4), (2, 2), (2,)]
    labels, gt_locations = criterion.assign(*padded)
    assert labels.shape == (2, 3000) and gt_locations.shape == (2, 4, 3000)


def test_module_copies_its_priors_to_another_device_once():
    # MultiboxLoss(..., device="cpu") with boxes on the GPU: a new copy of
    # the priors each step would be checked on the host each step (a
    # synchronisation). The meta device stands in for the GPU here.
    priors = standard_priors("ssdlite300")
    criterion = MultiboxLoss(priors, 0.5, 3, 0.1, 0.2, "cpu")
    meta = torch.device("meta")
    first = criterion._priors_on(meta)
    assert first.device == meta and criterion._priors_on(meta) is first
    assert criterion._priors_on(torch.device("cpu")) is criterion.priors
    criterion.priors.mul_(1.0)  # written in place: copied again
    second = criterion._priors_on(meta)
    assert second is not first and criterion._priors_on(meta) is second
    criterion.priors = priors.clone()  # replaced: copied again
    assert criterion._priors_on(meta) is not second


def test_opcheck():
    meta, a = load("t_threshold_045", COMMITTED)
    args = (a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"], 0.45, 0.1, 0.2)
    torch.library.opcheck(_assign_op, args, test_utils=("test_schema", "test_faketensor"))


def reference_losses(confidence, predicted_locations, labels, gt_locations, neg_pos_ratio):
    """The reference MultiboxLoss.forward, in plain PyTorch (float64)."""
    num_classes = confidence.size(2)
    with torch.no_grad():
        loss = -F.log_softmax(confidence, dim=2)[:, :, 0]
        pos_mask = labels > 0
        num_pos = pos_mask.long().sum(dim=1, keepdim=True)
        num_neg = num_pos * neg_pos_ratio
        loss[pos_mask] = -math.inf
        _, indexes = loss.sort(dim=1, descending=True)
        _, orders = indexes.sort(dim=1)
        mask = pos_mask | (orders < num_neg)
    classification_loss = F.cross_entropy(confidence[mask, :].reshape(-1, num_classes), labels[mask], reduction="sum")
    predicted = predicted_locations[pos_mask, :].reshape(-1, 4)
    gt = gt_locations[pos_mask, :].reshape(-1, 4)
    smooth_l1_loss = F.smooth_l1_loss(predicted, gt, reduction="sum")
    n = gt.size(0)
    return smooth_l1_loss / n, classification_loss / n


def test_module_reproduces_the_reference_losses():
    meta, a = load("t_ssdlite_voc", COMMITTED)
    priors = a["priors"]
    criterion = MultiboxLoss(priors, iou_threshold=0.5, neg_pos_ratio=3, center_variance=0.1, size_variance=0.2, device="cpu")
    labels, gt_locations = criterion.assign(a["gt_boxes"], a["gt_labels"], a["gt_counts"])
    check_case("t_ssdlite_voc", labels, gt_locations, a)
    b, p = labels.shape
    g = torch.Generator().manual_seed(0)
    confidence = torch.randn((b, p, 21), generator=g, requires_grad=True)
    predicted = (0.5 * torch.randn((b, p, 4), generator=g)).requires_grad_()
    reg, cls = criterion(confidence, predicted, labels, gt_locations)
    want_reg, want_cls = reference_losses(confidence.double(), predicted.double(), labels, gt_locations.double(), 3)
    assert math.isclose(reg.item(), want_reg.item(), rel_tol=1e-5), (reg.item(), want_reg.item())
    assert math.isclose(cls.item(), want_cls.item(), rel_tol=1e-5), (cls.item(), want_cls.item())
    (reg + cls).backward()
    c64 = confidence.detach().double().requires_grad_()
    p64 = predicted.detach().double().requires_grad_()
    r64, k64 = reference_losses(c64, p64, labels, gt_locations.double(), 3)
    (r64 + k64).backward()
    assert torch.allclose(confidence.grad.double(), c64.grad, atol=1e-6)
    assert torch.allclose(predicted.grad.double(), p64.grad, atol=1e-6)


def test_module_assign_pads_lists():
    meta, a = load("t_empty_image", COMMITTED)
    criterion = MultiboxLoss(a["priors"], 0.5, 3, 0.1, 0.2, "cpu")
    counts = a["gt_counts"].tolist()
    boxes = [a["gt_boxes"][i, :n] for i, n in enumerate(counts)]
    labels = [a["gt_labels"][i, :n] for i, n in enumerate(counts)]
    got_labels, got_loc = criterion.assign(boxes, labels)
    check_case("t_empty_image", got_labels, got_loc, a)
    with pytest.raises(ValueError):
        criterion.assign(a["gt_boxes"], a["gt_labels"])


def test_exports():
    for name in ("assign_targets", "pad_targets", "standard_priors", "MultiboxLoss"):
        assert name in multibox_torch.__all__ and hasattr(multibox_torch, name)


def test_priors_are_checked_once_per_tensor_and_again_after_a_write():
    # On CUDA the kernels read the priors unchecked. Before, only the first
    # priors of each (device, settings) were checked, when the assigner was
    # made; later calls' priors were passed on unchecked. Now each priors
    # tensor is checked on its first use and after an in-place write (the
    # bookkeeping runs on CPU tensors too; CUDA below).
    from multibox_torch import targets

    priors = standard_priors("ssdlite300").clone()
    key = targets._priors_key(priors)
    assert not targets._priors_checked(key, priors)
    targets._check_priors_on_host(priors)
    targets._priors_seen(key, priors)
    assert targets._priors_checked(key, priors)
    # A view of the same memory shares the version counter.
    assert targets._priors_checked(key, priors.view(-1, 4))
    priors[5, 2] = -0.1  # in place: checked again, and refused
    assert not targets._priors_checked(key, priors)
    with pytest.raises(multibox_torch.MultiboxError, match="prior 5 .* w, h > 0"):
        targets._check_priors_on_host(priors)
    priors[5, 2] = float("nan")
    with pytest.raises(multibox_torch.MultiboxError, match="prior 5 .* finite"):
        targets._check_priors_on_host(priors)
    # The entry goes with the tensor, so a new tensor at that address is checked.
    del priors
    assert key not in targets._checked_priors


@needs_gpu
def test_cuda_checks_every_priors_tensor():
    priors = standard_priors("ssdlite300").cuda()
    gt_boxes, gt_labels, gt_counts = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.4, 0.5]])], [torch.tensor([5])]
    )
    gt = (gt_boxes.cuda(), gt_labels.cuda(), gt_counts.cuda())
    want, _ = assign_targets(priors, *gt)  # makes the assigner for these settings
    bad = priors.clone()
    bad[7, 3] = 0.0
    with pytest.raises(multibox_torch.MultiboxError, match="prior 7"):
        assign_targets(bad, *gt)
    priors[7, 3] = float("inf")  # the checked tensor, written in place
    with pytest.raises(multibox_torch.MultiboxError, match="prior 7"):
        assign_targets(priors, *gt)
    priors[7, 3] = standard_priors("ssdlite300")[7, 3].item()
    got, _ = assign_targets(priors, *gt)
    assert torch.equal(got, want)


def test_num_classes_flags_box_labels_of_c_and_above():
    # SPEC.md, "Target assignment": a box label outside 1..C-1 is recorded
    # in the status word. The C ABI's config carries C (0: unknown); the
    # package passed 0, so a label >= C went unrecorded. Such a box is not
    # skipped: it is matched as any other, and its priors keep its label,
    # which the loss that follows refuses (NaN on CUDA, an error on the CPU).
    np = pytest.importorskip("numpy")
    priors = standard_priors("ssdlite300")
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]])
    box_labels = torch.tensor([[3, 21]])
    counts = torch.tensor([2], dtype=torch.int32)
    settings = dict(iou_threshold=0.5, neg_pos_ratio=3, center_variance=0.1, size_variance=0.2, device="cpu")

    # Without num_classes, as before: nothing recorded.
    before = MultiboxLoss(priors, **settings)
    want_labels, want_loc = before.assign(boxes, box_labels, counts)
    assert before.last_assign_status() == (False, False, False)
    assert (want_labels == 21).any() and (want_labels == 3).any()
    assert set(want_labels.unique().tolist()) == {0, 3, 21}

    # With C = 21: recorded, and the targets are the same.
    criterion = MultiboxLoss(priors, **settings, num_classes=21)
    labels, gt_locations = criterion.assign(boxes, box_labels, counts)
    status = criterion.last_assign_status()
    assert status.invalid_box_label and not status.count_clamped and not status.degenerate_box
    assert torch.equal(labels, want_labels) and torch.equal(gt_locations, want_loc)
    got = assign_targets(priors, boxes, box_labels, counts, num_classes=np.int64(21))
    assert torch.equal(got[0], want_labels) and torch.equal(got[1], want_loc)
    # ... and the loss with C = 21 refuses the prior labelled 21.
    b, p = labels.shape
    confidence = torch.randn((b, p, 21), requires_grad=True)
    predicted = torch.randn((b, p, 4), requires_grad=True)
    with pytest.raises(multibox_torch.MultiboxError):
        criterion(confidence, predicted, labels, gt_locations)

    # A label below C is not flagged; a label below 1 is, whatever C is
    # (its priors get -2).
    criterion = MultiboxLoss(priors, **settings, num_classes=22)
    criterion.assign(boxes, box_labels, counts)
    assert not criterion.last_assign_status().invalid_box_label
    labels, _ = criterion.assign(boxes, torch.tensor([[3, 0]]), counts)
    assert criterion.last_assign_status().invalid_box_label and (labels == -2).any()

    # None or an integer >= 2; bool, floats and strings refused.
    for bad in (True, 21.0, "21"):
        with pytest.raises(TypeError, match="num_classes must be None or an integer"):
            assign_targets(priors, boxes, box_labels, counts, num_classes=bad)
        with pytest.raises(TypeError, match="num_classes must be None or an integer"):
            MultiboxLoss(priors, **settings, num_classes=bad)
    for bad in (1, 0, -3, 2**32):
        with pytest.raises(ValueError, match="num_classes must be at least 2"):
            assign_targets(priors, boxes, box_labels, counts, num_classes=bad)
        with pytest.raises(ValueError, match="num_classes must be at least 2"):
            MultiboxLoss(priors, **settings, num_classes=bad)
    with pytest.raises(TypeError):
        assign_targets(priors, boxes, box_labels, counts, 0.5, 0.1, 0.2, 21)  # keyword-only


def test_opcheck_with_num_classes():
    _, a = load("t_threshold_045", COMMITTED)
    args = (a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"], 0.45, 0.1, 0.2, 21)
    torch.library.opcheck(_assign_op, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(
        lambda boxes: assign_targets(a["priors"], boxes, a["gt_labels"], a["gt_counts"], num_classes=21),
        fullgraph=True,
    )
    want = assign_targets(a["priors"], a["gt_boxes"], a["gt_labels"], a["gt_counts"])
    got = compiled(a["gt_boxes"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_gpu
def test_cuda_num_classes_flags_box_labels_of_c_and_above():
    # The kernels read C from the assigner's config: the CPU test above,
    # on the GPU.
    priors = standard_priors("ssdlite300")
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]])
    box_labels = torch.tensor([[3, 21]])
    counts = torch.tensor([2], dtype=torch.int32)
    settings = dict(iou_threshold=0.5, neg_pos_ratio=3, center_variance=0.1, size_variance=0.2)
    want = MultiboxLoss(priors, **settings, device="cpu", num_classes=21).assign(boxes, box_labels, counts)
    for classes, flagged in ((21, True), (22, False), (None, False)):
        criterion = MultiboxLoss(priors, **settings, device="cuda", num_classes=classes)
        labels, gt_locations = criterion.assign(boxes.cuda(), box_labels.cuda(), counts.cuda())
        assert criterion.last_assign_status().invalid_box_label == flagged, classes
        assert torch.equal(labels.cpu(), want[0])
        assert (gt_locations.cpu() - want[1]).abs().max() <= 1e-6 * max(1.0, want[1].abs().max().item())


def test_a_first_call_inside_a_graph_capture_asks_for_a_warm_up(monkeypatch):
    # The check comes before the library is touched, so a CPU-only machine
    # runs it with the capture faked; test_cuda_graph_capture_of_a_whole_step
    # meets the real one.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"multibox_loss: .*while a CUDA graph is being captured.*warm-up"):
        multibox_torch._loss_handle(0, 2.625, 0, 1.0)
    assert (0, 2.625, 0, 1.0) not in multibox_torch._losses


def _step_inputs(seed, b, t, p, c):
    """Targets (corner-form boxes, labels, counts of 1..t) and network
    outputs for one step, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((b, t, 2), generator=g) * 0.6
    size = 0.1 + torch.rand((b, t, 2), generator=g) * 0.3
    return [
        x.cuda()
        for x in (
            torch.cat([low, low + size], dim=-1),
            torch.randint(1, c, (b, t), generator=g),
            torch.randint(1, t + 1, (b,), generator=g, dtype=torch.int32),
            torch.randn((b, p, c), generator=g),
            torch.randn((b, p, 4), generator=g),
        )
    ]


@needs_gpu
# The two captures that raise before their first kernel end empty, which
# PyTorch warns of.
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_cuda_graph_capture_of_a_whole_step():
    """Assignment, loss and gradients captured once in a CUDA graph give,
    replayed on new inputs copied into the captured tensors, the eager
    step's results bit for bit. A first call inside a capture (it would
    load kernels) and ``pad_targets`` there (its counts come from the host)
    raise errors that say what to do instead."""
    from multibox_torch import targets

    priors = standard_priors("ssdlite300").cuda()
    b, t, p, c = 2, 4, priors.shape[0], 21
    # Settings no other test uses: their kernels are not loaded yet.
    criterion = MultiboxLoss(priors, 0.4375, 2.375, 0.1, 0.2, "cuda")
    index = torch.cuda.current_device()
    assert (index, 2.375, 0, 1.0) not in multibox_torch._losses and not any(
        key[:2] == (index, 0.4375) for key in targets._assigners
    ), "another call in this process used these settings: the first-call errors cannot be met"
    boxes, box_labels, counts, conf_values, loc_values = _step_inputs(1, b, t, p, c)
    confidence = conf_values.clone().requires_grad_()
    locations = loc_values.clone().requires_grad_()

    def step():
        labels, gt_locations = criterion.assign(boxes, box_labels, counts)
        reg, cls = criterion(confidence, locations, labels, gt_locations)
        (reg + cls).backward()
        return labels, reg, cls

    with pytest.raises(RuntimeError, match=r"assign_targets: .*warm-up"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()
    criterion.assign(boxes, box_labels, counts)  # loads the assignment's kernels
    with pytest.raises(RuntimeError, match=r"multibox_loss: .*warm-up"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()
    with pytest.raises(RuntimeError, match=r"pad_targets: .*before the capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pad_targets([boxes[0]], [box_labels[0]])

    # The warm-up PyTorch's CUDA graph notes ask for: on a side stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            confidence.grad = locations.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    confidence.grad = locations.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for seed in (2, 3):
        new = _step_inputs(seed, b, t, p, c)
        with torch.no_grad():
            for static, value in zip((boxes, box_labels, counts, conf_values, loc_values), new):
                static.copy_(value)
            confidence.copy_(conf_values)
            locations.copy_(loc_values)
        graph.replay()
        torch.cuda.synchronize()

        eager_conf = new[3].clone().requires_grad_()
        eager_loc = new[4].clone().requires_grad_()
        labels, gt_locations = criterion.assign(*new[:3])
        reg, cls = criterion(eager_conf, eager_loc, labels, gt_locations)
        (reg + cls).backward()
        assert (labels > 0).any(), "the case has positives"
        for got, want in zip(captured, (labels, reg, cls)):
            assert torch.equal(got, want)
        assert torch.equal(confidence.grad, eager_conf.grad)
        assert torch.equal(locations.grad, eager_loc.grad)

    # A status read waits for the stream: refused inside a capture, in words
    # of the package's, and the capture goes on.
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        torch.ones(1, device="cuda").add_(1)
        for read in (criterion.last_status, criterion.last_assign_status):
            with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
                read()
    assert not any(criterion.last_status()) and not any(criterion.last_assign_status())


@needs_gpu
def test_cuda_pad_targets_match_the_cpus():
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.2, 0.3, 0.6, 0.9]]), torch.zeros((0, 4)), torch.rand(3, 4)]
    labels = [torch.tensor([5, 2]), torch.zeros((0,), dtype=torch.int64), torch.tensor([1, 2, 3])]
    want = pad_targets(boxes, labels)
    got = pad_targets([x.cuda() for x in boxes], [x.cuda() for x in labels])
    torch.cuda.synchronize()  # the counts' copy does not wait
    for g, w in zip(got, want):
        assert g.is_cuda and torch.equal(g.cpu(), w)


def test_require_gpu_turns_a_gpu_tests_skip_into_a_failure():
    test = f"{Path(__file__).resolve()}::test_cuda_pad_targets_match_the_cpus"
    env = dict(os.environ, MULTIBOX_REQUIRE_GPU="1")
    env.pop("MULTIBOX_GPU_TESTS_ONLY", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                         capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert out.returncode == 0, out.stdout + out.stderr
    else:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "MULTIBOX_REQUIRE_GPU=1, but torch" in out.stdout, out.stdout
