"""The device status word from Python (SPEC.md: invalid labels and non-finite
inputs are recorded, and the caller reads them when it chooses, with one
explicit call that synchronises): ``MultiboxLoss.last_status()`` for the
loss and ``last_assign_status()`` for target assignment, after autograd's
backward and under torch.compile. CPU tensors here (the loss's flags
computed from the inputs, the assignment's from the crate's reference);
the CUDA cases read the kernels' status word where a GPU is present
(``scripts/gpu-check``).
"""

import pytest
import torch

import multibox_torch
from multibox_torch import LossStatus, MultiboxError, MultiboxLoss, TargetStatus, pad_targets, standard_priors

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]
CLEAN = LossStatus(invalid_label=False, nonfinite_input=False)


def batch(device, seed=0, b=2, p=64, c=5):
    """Random logits and offsets, ~40 % positives; prior 3 of image 0 ignored."""
    g = torch.Generator().manual_seed(seed)
    confidence = torch.randn(b, p, c, generator=g) * 2
    locations = torch.randn(b, p, 4, generator=g)
    gt = torch.randn(b, p, 4, generator=g)
    labels = torch.randint(1, c, (b, p), generator=g)
    labels[torch.rand(b, p, generator=g) < 0.6] = 0
    labels[0, 3] = -1
    return confidence.to(device), locations.to(device), labels.to(device), gt.to(device)


def criterion(device, **kwargs):
    return MultiboxLoss(standard_priors(), 0.5, 3, 0.1, 0.2, device, **kwargs)


def step(module, confidence, locations, labels, gt):
    """One training step's loss and backward; the losses, detached."""
    conf = confidence.detach().clone().requires_grad_()
    loc = locations.detach().clone().requires_grad_()
    reg, cls = module(conf, loc, labels, gt)
    (reg + cls).backward()
    return reg.detach(), cls.detach()


def with_invalid_label(labels):
    """A copy of ``labels`` with prior 0 of image 0 labelled 5, outside the
    C = 5 classes of ``batch``."""
    bad = labels.clone()
    bad[0, 0] = 5
    return bad


def first(labels, value):
    """(image, prior) of the first prior whose label is ``value`` (> 0: any positive)."""
    hits = (labels > 0) if value > 0 else (labels == value)
    b, p = hits.nonzero()[0].tolist()
    return b, p


# --- the loss ----------------------------------------------------------------


def test_before_any_call_there_is_no_status():
    module = criterion("cpu")
    with pytest.raises(RuntimeError, match="has not computed a loss yet"):
        module.last_status()
    with pytest.raises(RuntimeError, match="has not assigned targets yet"):
        module.last_assign_status()


@pytest.mark.parametrize("device", DEVICES)
def test_clean_inputs_give_a_clean_status(device):
    module = criterion(device)
    step(module, *batch(device))
    status = module.last_status()
    assert isinstance(status, LossStatus) and status == CLEAN
    assert status._fields == ("invalid_label", "nonfinite_input")
    assert "LossStatus" in multibox_torch.__all__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["ignored_logit", "background_logit", "positive_offset", "positive_target"])
def test_nonfinite_inputs_are_flagged(device, where):
    confidence, locations, labels, gt = batch(device)
    if where == "ignored_logit":  # every prior's logits count, ignored ones too
        confidence[(*first(labels, -1), 2)] = float("nan")
    elif where == "background_logit":
        confidence[(*first(labels, 0), 0)] = float("inf")
    elif where == "positive_offset":
        locations[(*first(labels, 1), 1)] = float("inf")
    else:
        gt[(*first(labels, 1), 3)] = float("nan")
    module = criterion(device)
    step(module, confidence, locations, labels, gt)
    assert module.last_status() == LossStatus(invalid_label=False, nonfinite_input=True)
    # The next call's status replaces it.
    step(module, *batch(device))
    assert module.last_status() == CLEAN


@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=needs_gpu),
     pytest.param("cuda", torch.float16, marks=needs_gpu)],
)
def test_offset_differences_are_taken_in_f32(device, dtype):
    # Finite offsets of opposite sign: their difference overflows f32, and
    # is flagged, but never f16's range once widened to f32.
    confidence, locations, labels, gt = batch(device)
    big = 3e38 if dtype == torch.float32 else 60000.0
    b, p = first(labels, 1)
    locations[b, p, 0], gt[b, p, 0] = big, -big
    module = criterion(device)
    step(module, confidence.to(dtype), locations.to(dtype), labels, gt.to(dtype))
    overflows = dtype == torch.float32
    assert module.last_status() == LossStatus(invalid_label=False, nonfinite_input=overflows)


@pytest.mark.parametrize("device", DEVICES)
def test_a_background_prior_offsets_are_not_read(device):
    # Only positives' box offsets enter the loss, and only they are checked.
    confidence, locations, labels, gt = batch(device)
    locations[(*first(labels, 0), 0)] = float("nan")
    module = criterion(device)
    step(module, confidence, locations, labels, gt)
    assert module.last_status() == CLEAN


@pytest.mark.parametrize("device", DEVICES)
def test_channel_major_offsets_are_read_along_their_axis(device):
    confidence, locations, labels, gt = batch(device)
    b, p = first(labels, 1)
    locations[b, p, 2] = float("nan")
    module = criterion(device, layout="channel_major")
    cm = [t.transpose(1, 2).contiguous() for t in (confidence, locations, gt)]
    step(module, cm[0], cm[1], labels, cm[2])
    assert module.last_status() == LossStatus(invalid_label=False, nonfinite_input=True)
    # The same NaN on a background prior: not read.
    locations = batch(device)[1]
    locations[(*first(labels, 0), 2)] = float("nan")
    step(module, cm[0], locations.transpose(1, 2).contiguous(), labels, cm[2])
    assert module.last_status() == CLEAN


def test_cpu_invalid_label_raises_and_keeps_the_last_status():
    # The CPU reference refuses an invalid label before it computes
    # anything, so there is no status to record: invalid_label stays False.
    confidence, locations, labels, gt = batch("cpu")
    module = criterion("cpu")
    step(module, *batch("cpu"))
    bad = with_invalid_label(labels)
    with pytest.raises(MultiboxError, match="label 5"):
        module(confidence, locations, bad, gt)
    assert module.last_status() == CLEAN


@needs_gpu
def test_cuda_invalid_label_is_flagged_and_gives_nan_losses():
    confidence, locations, labels, gt = batch("cuda")
    bad = with_invalid_label(labels)
    module = criterion("cuda")
    reg, cls = step(module, confidence, locations, bad, gt)
    assert torch.isnan(reg) and torch.isnan(cls)
    assert module.last_status() == LossStatus(invalid_label=True, nonfinite_input=False)
    step(module, confidence, locations, labels, gt)
    assert module.last_status() == CLEAN


@needs_gpu
def test_cuda_steps_do_not_synchronise_until_the_status_is_read():
    # The status is kept, not read: torch's sync debug mode raises on any
    # host synchronisation in the steps; only last_status() waits.
    confidence, locations, labels, gt = batch("cuda")
    module = criterion("cuda")
    step(module, confidence, locations, labels, gt)  # loads the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(module, confidence, locations, labels, gt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module.last_status() == CLEAN


@needs_gpu
def test_cuda_status_read_from_another_stream_sees_a_side_streams_step():
    # The step runs on a side stream held back by a sleep; the read comes
    # from the default stream, which does not wait for the side one: the
    # read waits for the device, so it sees that step's status.
    confidence, locations, labels, gt = batch("cuda")
    bad = with_invalid_label(labels)
    module = criterion("cuda")
    step(module, confidence, locations, labels, gt)  # loads the kernels
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # some 50 ms of GPU cycles
        step(module, confidence, locations, bad, gt)
    assert module.last_status() == LossStatus(invalid_label=True, nonfinite_input=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [None, True])
def test_status_after_a_compiled_step(device, dynamic, compile_backend):
    # The loss call stays in the compiled graph (fullgraph); the module
    # keeps the status of the compiled call for an eager last_status().
    confidence, locations, labels, gt = batch(device)
    module = criterion(device)

    def train_step(confidence, locations, labels, gt):
        reg, cls = module(confidence, locations, labels, gt)
        return reg + cls

    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, dynamic=dynamic, backend=compile_backend)
    for poisoned in (False, True, False):
        conf = confidence.clone()
        if poisoned:
            conf[(*first(labels, -1), 0)] = float("nan")
        conf.requires_grad_()
        compiled(conf, locations, labels, gt).backward()
        assert module.last_status() == LossStatus(invalid_label=False, nonfinite_input=poisoned)
    # The module compiled as a whole, too.
    torch._dynamo.reset()
    compiled_module = torch.compile(module, fullgraph=True, dynamic=dynamic, backend=compile_backend)
    conf = confidence.clone()
    conf[(*first(labels, 0), 1)] = float("inf")
    compiled_module(conf, locations, labels, gt)
    assert compiled_module.last_status() == LossStatus(invalid_label=False, nonfinite_input=True)


# --- target assignment -------------------------------------------------------


def targets(device, problem=None):
    """Two images' padded boxes, with one problem the assignment records."""
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]), torch.tensor([[0.2, 0.3, 0.6, 0.7]])]
    labels = [torch.tensor([3, 1]), torch.tensor([2])]
    if problem == "degenerate_box":
        boxes[0][1] = torch.tensor([0.5, 0.5, 0.4, 0.8])  # x1 < x0
    elif problem == "invalid_box_label":
        labels[1][0] = 0
    gt_boxes, gt_labels, gt_counts = pad_targets(boxes, labels)
    if problem == "count_clamped":
        gt_counts[1] = -1  # clamped to 0 (a count past T would read the padding rows)
    return gt_boxes.to(device), gt_labels.to(device), gt_counts.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem", [None, "count_clamped", "invalid_box_label", "degenerate_box"])
def test_assignment_status(device, problem):
    module = criterion(device)
    labels, _ = module.assign(*targets(device, problem))
    assert labels.shape == (2, 3000)
    status = module.last_assign_status()
    assert isinstance(status, TargetStatus)
    want = {field: field == problem for field in TargetStatus._fields}
    assert status._asdict() == want, status
    # The next assignment's status replaces it.
    module.assign(*targets(device))
    assert module.last_assign_status() == TargetStatus(False, False, False)
