#!/usr/bin/env python3
"""The MultiBox loss in plain PyTorch, the baseline our kernels are measured
against, and a check that both compute the same losses.

    scripts/pytorch_baseline.py [--out FILE.jsonl] [--compare BENCH_COMPARE]
                                [--lib LIBMULTIBOX] [--budget SECONDS] [--quick]
                                [--no-compile] [--compile-dtypes f16,...]

1. Check: draws small batches (B=4) of each benchmark shape and input type
   deterministically, writes them in the layout of tests/goldens/ and runs
   BENCH_COMPARE (the `bench_compare` example: our losses on the GPU, else
   our CPU reference) over them; compares with the reference algorithm below
   run in float64 on the same values (relative 1e-5, num_pos exact).
2. Timing (needs a CUDA device): forward + backward of the reference
   algorithm, eager and under torch.compile, at the shapes and input types
   of benches/gpu.rs. Each call is timed with CUDA events, after a warm-up,
   rotating among input sets whose bytes exceed the L2 cache 4 times; the
   median is reported. torch.compile runs with its defaults (after the first
   shape of a dtype it recompiles with dynamic shapes, as a training run
   that changes shapes would), for the --compile-dtypes only (f16 by
   default: each dtype compiles again, which a short budget cannot afford).
   Every case stops when --budget seconds are spent, a compile included,
   and is recorded as skipped.
   Our op (multibox_torch over --lib, row-major, the same normaliser) is
   timed the same way on the same inputs (impl "ours_op"), so that the
   comparison with eager PyTorch is made from Python on both sides.

   NVIDIA's SSD loss (DeepLearningExamples, PyTorch/Detection/SSD,
   `ssd/model.py`'s `Loss`: channel-major `[B, C, P]` / `[B, 4, P]` inputs,
   hard negatives by two sorts of the cross-entropy, each image divided by
   its own positive count, the mean over images) is timed too, eagerly, on
   channel-major inputs, beside our PyTorch op on the same inputs with
   `layout="channel_major", normalizer="per_image"` (impls "nvidia" and
   "ours_channel_major"; the op comes from multibox_torch, over --lib).

3. Target assignment (SPEC.md, "Target assignment"): the reference's
   `MatchPrior` written below in plain PyTorch, timed per image on the CPU
   (as the data loader's workers run it; wall clock, median image, times B)
   and batched on the GPU (one padded batch, CUDA events, median), at the
   cases of benches/gpu.rs's assignment (B 32/256, SSDLite-300 and SSD300
   priors, T 20/100). First a check that the batched version gives the
   per-image version's labels on small batches.

4. NVIDIA's loss against ours (`layout="channel_major",
   normalizer="per_image"`, ratio 3) on the same channel-major inputs, with
   the semantic differences kept out of the inputs (see `nvidia_ssd_loss`):
   the loss and both gradients, NVIDIA's in float64. On the GPU if there
   is one, else on the CPU (our CPU reference, float32 inputs).

One JSON object per line goes to --out (kind "compare", "time",
"assign_compare", "assign_time" or "nvidia_compare"). The
reference algorithm is docs/SPEC.md's, as the SSD training code writes it:
a sort of the background losses, then a sort of the sort, boolean indexing
(which synchronises with the host), cross_entropy and smooth_l1_loss.

Each part runs even when one before it broke (its error is logged and
recorded). Exit status: 0 when done, 3 when skipped (no PyTorch), 1 when a
comparison failed or something broke.
"""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

SHAPES = [  # name, B, P, C: the shapes of benches/gpu.rs
    ("ssdlite_voc", 32, 3000, 21),
    ("ssdlite_coco", 32, 3000, 91),
    ("ssd300_coco", 32, 8732, 81),
    ("ssd300_coco", 256, 8732, 81),
]
DTYPES = ["f32", "f16", "bf16"]
NEG_POS_RATIO = 3.0
POSITIVE_FRACTION = 0.02  # as multibox::synthetic::BatchSpec::default()
RTOL = 1e-5


def log(*a):
    print(*a, flush=True)


def multibox_loss(confidence, predicted_locations, labels, gt_locations,
                  neg_pos_ratio=NEG_POS_RATIO, stable=False):
    """docs/SPEC.md's reference algorithm. `stable=True` sorts stably, so
    that ties go to the lower prior index as in our kernels (used for the
    check only; the timed version sorts as the reference code does)."""
    import torch
    import torch.nn.functional as F

    num_classes = confidence.size(2)
    with torch.no_grad():
        bg = -F.log_softmax(confidence, dim=2)[:, :, 0]
        pos = labels > 0
        num_neg = pos.long().sum(dim=1, keepdim=True) * neg_pos_ratio
        bg[pos] = -math.inf
        _, indexes = bg.sort(dim=1, descending=True, stable=stable)
        _, orders = indexes.sort(dim=1, stable=stable)
        mask = pos | (orders < num_neg)
    cls = F.cross_entropy(confidence[mask, :].reshape(-1, num_classes),
                          labels[mask], reduction="sum")
    pred = predicted_locations[pos, :].reshape(-1, 4)
    gt = gt_locations[pos, :].reshape(-1, 4)
    reg = F.smooth_l1_loss(pred, gt, reduction="sum")
    num_pos = gt.size(0)
    return reg / num_pos, cls / num_pos


def nvidia_ssd_loss(ploc, plabel, gloc, glabel):
    """NVIDIA's SSD loss (DeepLearningExamples, PyTorch/Detection/SSD,
    `ssd/model.py`, `Loss.forward`), written here from its semantics:

        ploc [B, 4, P], plabel [B, C, P] (channel-major), gloc [B, 4, P],
        glabel [B, P] -> one scalar, sum of both losses

    - smooth-L1 (beta 1) over the 4 coordinates of the positives
      (glabel > 0), summed per image;
    - cross-entropy of every prior; the hard-negative key is that
      cross-entropy with the positives' set to 0, sorted descending (not
      stably), ranked by a second sort; the first min(3 pos_b, P) are
      mined; the classification sum per image is over positives or mined;
    - each image's (reg + cls) divided by its positive count, 0 for an
      image without positives (a `pos_num > 0` mask, the count clamped to
      1e-6), then the mean over the B images.

    Where it differs from ours (`layout="channel_major",
    normalizer="per_image"`, neg_pos_ratio 3):
    - NVIDIA's `Loss` takes box targets in xywh and encodes them against its
      default boxes inside the loss (`_loc_vec`, variances 0.1/0.2); ours
      takes encoded offsets (the crate's target assignment encodes them).
      Here both get encoded offsets, so that encoding step is not timed.
    - It has no ignore label: labels must be 0..C-1 (cross_entropy refuses
      -1). The inputs here have none.
    - Its negatives are capped at P, not at the image's candidates: when
      3 pos_b exceeds the negatives, ranks past them fall on positives
      (key 0, already in the set), so the set is the same unless a
      negative's cross-entropy is exactly 0 (a tie with the positives,
      which then makes no difference to the loss either).
    - Its sort is not stable: a tie among negatives' keys may choose other
      priors than ours (lower index first). The loss is the same (for a
      negative the key is its loss), the gradients' rows differ. The
      inputs here are continuous random values: no ties.
    - Its keys are the cross-entropy in the input dtype; ours are computed
      in f32 from any input dtype.
    - The fixed ratio 3 and no floor on the negatives
      (min_negatives_per_image 0).
    """
    import torch
    import torch.nn.functional as F

    pos = glabel > 0
    pos_num = pos.sum(dim=1)
    reg = (F.smooth_l1_loss(ploc, gloc, reduction="none").sum(dim=1) * pos).sum(dim=1)
    ce = F.cross_entropy(plabel, glabel, reduction="none")  # [B, P]
    with torch.no_grad():
        key = ce.masked_fill(pos, 0.0)
        order = key.sort(dim=1, descending=True).indices
        rank = order.sort(dim=1).indices
        neg = rank < torch.clamp(3 * pos_num, max=pos.shape[1]).unsqueeze(-1)
    cls = (ce * (pos | neg)).sum(dim=1)
    per_image = (reg + cls) * (pos_num > 0).float() / pos_num.float().clamp(min=1e-6)
    return per_image.mean(dim=0)


def load_multibox_torch(lib):
    """Our PyTorch op, and None or why it cannot be loaded. With --lib (a
    library built from this checkout, as gpu-check carries it): this
    checkout's python/ package over that library. Without: the installed
    package, else this checkout's python/ (over $MULTIBOX_LIB or
    target/release)."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
    if lib:
        os.environ["MULTIBOX_LIB"] = os.path.abspath(lib)
        sys.path.insert(0, source)
    try:
        import multibox_torch
    except ImportError:
        sys.path.insert(0, source)
        try:
            import multibox_torch
        except Exception as e:  # noqa: BLE001 - report why
            return None, f"{type(e).__name__}: {e}"
    try:
        multibox_torch.library_path()
    except Exception as e:  # noqa: BLE001 - no library: report why
        return None, f"{type(e).__name__}: {e}"
    return multibox_torch, None


def ours_row_major(mb):
    """Our op as a PyTorch user calls it: (reg, cls) of row-major inputs,
    the reference's normaliser. Beside `eager`, it is the like-for-like
    comparison from Python (the bench's `ours us` is the Rust API's)."""
    def loss(conf, loc, labels, gt):
        reg, cls, _ = mb.multibox_loss(conf, loc, labels, gt, neg_pos_ratio=NEG_POS_RATIO)
        return reg, cls
    return loss


def ours_channel_major(mb):
    """Our op with NVIDIA's semantics: (reg, cls) of channel-major inputs,
    each image divided by its own positives, the mean over images."""
    def loss(conf, loc, labels, gt):
        reg, cls, _ = mb.multibox_loss(conf, loc, labels, gt, neg_pos_ratio=3.0,
                                       layout="channel_major", normalizer="per_image")
        return reg, cls
    return loss


def nvidia_as_pair(conf, loc, labels, gt):
    """NVIDIA's loss in the (reg, cls) form the timing harness sums: its one
    scalar and a zero. Arguments in our order (conf, loc, labels, gt)."""
    return nvidia_ssd_loss(loc, conf, gt, labels), 0.0


def draw_channel_major(b, p, c, dtype, seed, device="cpu"):
    """draw()'s inputs, channel-major: [B, C, P] logits, [B, 4, P] offsets
    (drawn so, not transposed copies)."""
    conf, loc, labels, gt = draw(b, p, c, dtype, seed, device)
    return (conf.transpose(1, 2).contiguous(), loc.transpose(1, 2).contiguous(), labels,
            gt.transpose(1, 2).contiguous())


def torch_dtype(name):
    import torch
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def draw(b, p, c, dtype, seed, device="cpu", label_dtype=None):
    """Inputs like the crate's synthetic batches: normal logits and offsets,
    2 % positives with a uniform class. Rounded to `dtype`."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch_dtype(dtype)
    conf = torch.randn(b, p, c, generator=gen, device=device).to(t)
    loc = torch.randn(b, p, 4, generator=gen, device=device).to(t)
    gt = torch.randn(b, p, 4, generator=gen, device=device).to(t)
    u = torch.rand(b, p, generator=gen, device=device)
    cls = torch.randint(1, c, (b, p), generator=gen, device=device)
    labels = torch.where(u < POSITIVE_FRACTION, cls, torch.zeros_like(cls))
    if label_dtype is not None:
        labels = labels.to(label_dtype)
    return conf, loc, labels, gt


# ---------------------------------------------------------------- the check

def write_case(root, name, tensors, dtype, label_name):
    import torch
    conf, loc, labels, gt = tensors
    b, p, c = conf.shape
    d = os.path.join(root, name)
    os.makedirs(d)
    for fname, t in [("confidence.bin", conf), ("locations.bin", loc),
                     ("gt_locations.bin", gt)]:
        t.to(torch.float32).contiguous().cpu().numpy().tofile(os.path.join(d, fname))
    labels.contiguous().cpu().numpy().tofile(os.path.join(d, "labels.bin"))
    meta = {"name": name, "batch": b, "priors": p, "classes": c,
            "neg_pos_ratio": NEG_POS_RATIO, "input_dtype": dtype,
            "label_dtype": label_name}
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(meta, f)


def check(args, out):
    import torch
    cases = []
    for (name, _, p, c) in SHAPES[:3]:
        for dtype in DTYPES:
            cases.append((f"{name}_{dtype}_i64", 4, p, c, dtype, torch.int64, "i64"))
    cases.append(("ssdlite_voc_f32_i32", 4, 3000, 21, "f32", torch.int32, "i32"))
    if args.quick:
        cases = cases[:1] + cases[-1:]
    if not args.compare or not os.path.exists(args.compare):
        log(f"check skipped: no bench_compare binary ({args.compare!r})")
        out.write(json.dumps({"kind": "compare", "skipped": "no bench_compare binary"}) + "\n")
        return True
    root = tempfile.mkdtemp(prefix="multibox_compare_")
    expected = {}
    try:
        for i, (name, b, p, c, dtype, ldt, lname) in enumerate(cases):
            tensors = draw(b, p, c, dtype, seed=1000 + i, label_dtype=ldt)
            write_case(root, name, tensors, dtype, lname)
            conf, loc, labels, gt = (t.to(torch.float64) if t.is_floating_point() else t.long()
                                     for t in tensors)
            reg, cls = multibox_loss(conf, loc, labels, gt, stable=True)
            expected[name] = (float(reg), float(cls), int((labels > 0).sum()))
        run = subprocess.run([args.compare, root], capture_output=True, text=True,
                             timeout=max(30, args.budget / 3))
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            log(f"check FAILED: bench_compare exited {run.returncode}")
            return False
        ours = {}
        for line in run.stdout.splitlines():
            if line.strip():
                rec = json.loads(line)
                ours[rec.get("case")] = rec
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ok = True
    gpu = torch.cuda.is_available()
    for name, (reg, cls, n) in expected.items():
        rec = ours.get(name, {"error": "no output for this case"})
        problems = []
        if "error" in rec:
            problems.append(rec["error"])
        else:
            for key, ref in [("regression_loss", reg), ("classification_loss", cls)]:
                err = abs(rec[key] - ref) / max(abs(ref), 1e-30)
                if not err <= RTOL:
                    problems.append(f"{key} {rec[key]!r} vs {ref!r} (rel {err:.2e})")
            if rec["num_pos"] != n:
                problems.append(f"num_pos {rec['num_pos']} vs {n}")
            if rec.get("status") != "ok":
                problems.append(f"status {rec.get('status')}")
            if gpu and not str(rec.get("backend", "")).startswith("gpu"):
                problems.append(f"ours ran on {rec.get('backend')!r} while PyTorch sees a GPU")
        good = not problems
        ok &= good
        log(f"check {name:24} {'ok    ' if good else 'FAILED'} ours "
            f"{rec.get('backend', '?')}: reg {rec.get('regression_loss')} cls "
            f"{rec.get('classification_loss')} N {rec.get('num_pos')}; float64 PyTorch: "
            f"reg {reg:.9g} cls {cls:.9g} N {n}" + ("" if good else "  " + "; ".join(problems)))
        out.write(json.dumps({"kind": "compare", "case": name, "ok": good,
                              "backend": rec.get("backend"), "problems": problems,
                              "ours": [rec.get("regression_loss"), rec.get("classification_loss"),
                                       rec.get("num_pos")],
                              "pytorch_f64": [reg, cls, n]}) + "\n")
    return ok


# ------------------------------------------------- NVIDIA's loss and ours

NVIDIA_GRAD_TOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 8e-3}  # of the largest gradient


def nvidia_cases(gpu, quick):
    """(name, B, P, C, dtype, seed, tweak): channel-major check cases. An
    image without a positive and an image whose 3 pos_b exceeds its
    negatives (NVIDIA caps at P, we at the candidates) are in each."""
    if not gpu:
        return [("ssdlite_voc_cpu_f32", 4, 3000, 21, "f32", 2000, True)]
    cases = [(f"{name}_{dtype}", 4, p, c, dtype, 2000 + i, True)
             for i, (name, _, p, c) in enumerate(SHAPES[:3]) for dtype in DTYPES]
    return cases[:1] if quick else cases


def nvidia_check(args, out, mb):
    """NVIDIA's loss (float64) against our op (channel-major, per image) on
    the same inputs: the loss (relative 1e-5) and both gradients (1e-5 of
    the largest in f32, one rounding to f16 / bf16 otherwise)."""
    import torch
    if mb is None:
        log(f"nvidia check skipped: our PyTorch op is not available ({args.mb_error})")
        out.write(json.dumps({"kind": "nvidia_compare", "skipped": f"no multibox_torch: {args.mb_error}"}) + "\n")
        return True
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    ours = ours_channel_major(mb)
    ok = True
    for name, b, p, c, dtype, seed, tweak in nvidia_cases(gpu, args.quick):
        conf, loc, labels, gt = draw_channel_major(b, p, c, dtype, seed)
        if tweak:
            labels[1] = 0  # no positive: adds 0 in both
            labels[2, : (3 * p) // 8] = 1 + torch.arange((3 * p) // 8) % (c - 1)  # 3 pos > negatives
        conf, loc, labels, gt = (t.to(device) for t in (conf, loc, labels, gt))
        c1, l1 = conf.clone().requires_grad_(), loc.clone().requires_grad_()
        reg, cls = ours(c1, l1, labels, gt)
        (reg + cls).backward()
        c2, l2 = conf.double().requires_grad_(), loc.double().requires_grad_()
        want = nvidia_ssd_loss(l2, c2, gt.double(), labels)
        want.backward()
        got = float(reg.detach()) + float(cls.detach())
        problems = []
        want = float(want.detach())
        err = abs(got - want) / max(abs(want), 1e-30)
        if not err <= RTOL:
            problems.append(f"loss {got!r} vs {float(want)!r} (rel {err:.2e})")
        for what, g, w in (("d confidence", c1.grad, c2.grad), ("d locations", l1.grad, l2.grad)):
            gerr = ((g.double() - w).abs().max() / w.abs().max().clamp(min=1e-30)).item()
            if not gerr <= NVIDIA_GRAD_TOL[dtype]:
                problems.append(f"{what} off by {gerr:.2e} of the largest")
        good = not problems
        ok &= good
        log(f"nvidia check {name:22} {'ok    ' if good else 'FAILED'} ours (channel-major, per image) "
            f"{got:.9g}, NVIDIA's in float64 {float(want):.9g}" + ("" if good else "  " + "; ".join(problems)))
        out.write(json.dumps({"kind": "nvidia_compare", "case": name, "ok": good, "device": device,
                              "ours": got, "nvidia_f64": float(want), "problems": problems}) + "\n")
    return ok


# --------------------------------------------------------------- the timing

class OutOfTime(BaseException):
    """The run's --budget ended during a case. A BaseException: Dynamo and
    Inductor wrap any Exception raised inside a compile in their own error
    types, which would turn a case cut short into a failure."""


_armed = False


def _out_of_time(signum, frame):
    # Only inside a case: an alarm that lands while a case is being wound
    # up (its record written, its memory freed) is ignored.
    if _armed:
        raise OutOfTime("time budget spent during the case")


def until(deadline):
    """Raises OutOfTime in the main thread at `deadline` (time.monotonic()):
    a torch.compile that runs past the budget ends as a skipped case, not as
    a run killed from outside with its later parts lost. until(None) stops
    the clock, disarming it first."""
    global _armed
    if deadline is None:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.signal(signal.SIGALRM, _out_of_time)
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, max(0.1, deadline - time.monotonic()))


def time_calls(fn, sets, n, warmup):
    """Median device time of one forward+backward, by CUDA events around
    each call, calls back to back, rotating over `sets`."""
    import torch

    def step(i):
        conf, loc, labels, gt = sets[i % len(sets)]
        conf.grad = None
        loc.grad = None
        reg, cls = fn(conf, loc, labels, gt)
        (reg + cls).backward()  # NVIDIA's loss returns (total, 0.0)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for i in range(n):
        step(i)
        events[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(1e3 * a.elapsed_time(b) for a, b in zip(events, events[1:]))


CHANNEL_MAJOR_IMPLS = ("nvidia", "ours_channel_major", "nvidia_compile")
COMPILED_IMPLS = ("compile", "nvidia_compile")


def min_bytes(b, p, c, elem):
    return 2 * b * p * c * elem + 3 * b * p * 4 * elem + b * p * 8


def timing(args, out, deadline, mb=None):
    """The reference eager, then (with our op `mb`) ours, NVIDIA's loss and
    ours on the same channel-major inputs, then torch.compile of the
    reference and of NVIDIA's loss."""
    import torch
    if not torch.cuda.is_available():
        log("timing skipped: PyTorch sees no CUDA device")
        out.write(json.dumps({"kind": "time", "skipped": "no CUDA device"}) + "\n")
        return True
    props = torch.cuda.get_device_properties(0)
    device = props.name
    l2 = getattr(props, "L2_cache_size", 0) or (50 << 20)
    log(f"device: {device}; torch {torch.__version__}; L2 {l2 >> 20} MB")
    try:
        import torch._dynamo as dynamo
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 64)
    except Exception as e:  # noqa: BLE001 - older or newer torch: keep going
        log(f"note: could not raise dynamo's recompile limit: {e}")
    compiled = torch.compile(multibox_loss)
    # NVIDIA's formulation has no boolean indexing, so no graph break and no
    # host synchronisation: the strongest PyTorch baseline under compile.
    nvidia_compiled = torch.compile(nvidia_as_pair)

    shapes = SHAPES[:1] if args.quick else SHAPES
    n_target = 0.05 if args.quick else 0.3
    ok = True
    # Eager for every case first, then our op from Python on the same
    # inputs, then NVIDIA's loss and ours side by side (channel-major, per
    # image), then torch.compile of the reference and of NVIDIA's loss (of
    # --compile-dtypes; dtype by dtype, so that each dtype's recompiles
    # happen once) last, while the budget lasts: their first compiles can
    # take whatever time is left.
    impls = ["eager"] + (["ours_op"] if mb is not None else [])
    impls += ["nvidia", "ours_channel_major"] if mb is not None else []
    impls += [] if args.no_compile else ["compile"] + (["nvidia_compile"] if mb is not None else [])
    plan = [(impl, dtype, shape) for impl in impls for dtype in DTYPES for shape in shapes
            if impl not in COMPILED_IMPLS or dtype in args.compile_dtypes]
    fns = {"eager": multibox_loss, "compile": compiled, "nvidia": nvidia_as_pair, "nvidia_compile": nvidia_compiled}
    if mb is not None:
        fns["ours_op"] = ours_row_major(mb)
        fns["ours_channel_major"] = ours_channel_major(mb)
    for impl, dtype, (name, b, p, c) in plan:
        rec = {"kind": "time", "impl": impl, "case": name, "batch": b, "priors": p,
               "classes": c, "dtype": dtype, "labels": "i64", "device": device,
               "layout": "channel_major" if impl in CHANNEL_MAJOR_IMPLS else "row_major"}
        left = deadline - time.monotonic()
        if left < (60 if impl in COMPILED_IMPLS else 15):
            rec["skipped"] = f"time budget spent ({left:.0f} s left)"
            log(f"{impl:18} {name:12} B={b:<3} {dtype:4}: skipped, {rec['skipped']}")
            out.write(json.dumps(rec) + "\n")
            continue
        try:
            until(deadline)
            elem = torch.tensor([], dtype=torch_dtype(dtype)).element_size()
            nsets = max(2, min(16, math.ceil(4 * l2 / min_bytes(b, p, c, elem))))
            sets = []
            drawer = draw_channel_major if impl in CHANNEL_MAJOR_IMPLS else draw
            for s in range(nsets):
                conf, loc, labels, gt = drawer(b, p, c, dtype, seed=s, device="cuda")
                sets.append((conf.requires_grad_(), loc.requires_grad_(), labels, gt))
            fn = fns[impl]
            t0 = time.monotonic()
            time_calls(fn, sets, n=1, warmup=1)  # compiles, for torch.compile
            first_s = time.monotonic() - t0
            t0 = time.monotonic()
            time_calls(fn, sets, n=3, warmup=0)
            per_call = (time.monotonic() - t0) / 3
            n = int(max(10, min(500, n_target / max(per_call, 1e-6))))
            us = time_calls(fn, sets, n=n, warmup=nsets)
            rec.update({"us": us, "calls": n, "sets": nsets, "first_call_s": first_s})
            log(f"{impl:18} {name:12} B={b:<3} {dtype:4}: {us:10.1f} us  "
                f"(median of {n}, {nsets} sets; first call {first_s:.1f} s)")
        except OutOfTime as e:
            until(None)
            rec["skipped"] = str(e)
            log(f"{impl:18} {name:12} B={b:<3} {dtype:4}: skipped, {e}")
        except Exception as e:  # noqa: BLE001 - report and go on with the next case
            until(None)
            if time.monotonic() >= deadline:
                # The alarm, wrapped by a library that caught it anyway.
                rec["skipped"] = f"time budget spent during the case ({type(e).__name__})"
                log(f"{impl:18} {name:12} B={b:<3} {dtype:4}: skipped, {rec['skipped']}")
            else:
                ok = False
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"{impl:18} {name:12} B={b:<3} {dtype:4}: FAILED {rec['error']}")
        finally:
            until(None)
            sets = None
            torch.cuda.empty_cache()
        out.write(json.dumps(rec) + "\n")
        out.flush()
    return ok


# ------------------------------------------------------ target assignment

ASSIGN_CASES = [(priors, b, t) for priors in ("ssdlite300", "ssd300") for b in (32, 256) for t in (20, 100)]
PRIOR_SPECS = {  # (feature map, shrinkage, min size, max size, aspect ratios), image 300
    "ssdlite300": [(19, 16, 60, 105, [2, 3]), (10, 32, 105, 150, [2, 3]), (5, 64, 150, 195, [2, 3]),
                   (3, 100, 195, 240, [2, 3]), (2, 150, 240, 285, [2, 3]), (1, 300, 285, 330, [2, 3])],
    "ssd300": [(38, 8, 30, 60, [2]), (19, 16, 60, 111, [2, 3]), (10, 32, 111, 162, [2, 3]),
               (5, 64, 162, 213, [2, 3]), (3, 100, 213, 264, [2]), (1, 300, 264, 315, [2])],
}


def ssd_priors(name, image_size=300):
    """The standard SSD priors [P, 4] (center form, float32, clamped)."""
    import torch
    rows = []
    for fm, shrinkage, small, big, ratios in PRIOR_SPECS[name]:
        scale = image_size / shrinkage
        for j in range(fm):
            for i in range(fm):
                cx, cy = (i + 0.5) / scale, (j + 0.5) / scale
                s = small / image_size
                rows.append([cx, cy, s, s])
                s2 = math.sqrt(big * small) / image_size
                rows.append([cx, cy, s2, s2])
                for r in ratios:
                    r = math.sqrt(r)
                    rows.append([cx, cy, s * r, s / r])
                    rows.append([cx, cy, s / r, s * r])
    return torch.tensor(rows, dtype=torch.float32).clamp_(0.0, 1.0)


def _area(lt, rb):
    hw = (rb - lt).clamp(min=0.0)
    return hw[..., 0] * hw[..., 1]


def _iou(boxes0, boxes1, eps=1e-5):
    import torch
    lt = torch.max(boxes0[..., :2], boxes1[..., :2])
    rb = torch.min(boxes0[..., 2:], boxes1[..., 2:])
    overlap = _area(lt, rb)
    return overlap / (_area(boxes0[..., :2], boxes0[..., 2:]) + _area(boxes1[..., :2], boxes1[..., 2:]) - overlap + eps)


def _corners(priors):
    import torch
    return torch.cat([priors[..., :2] - priors[..., 2:] / 2, priors[..., :2] + priors[..., 2:] / 2], -1)


def _encode(boxes, priors, center_variance=0.1, size_variance=0.2):
    import torch
    center = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
    return torch.cat([(center[..., :2] - priors[..., :2]) / priors[..., 2:] / center_variance,
                      torch.log(center[..., 2:] / priors[..., 2:]) / size_variance], -1)


def match_prior(priors, corner_priors, gt_boxes, gt_labels, iou_threshold=0.5, center_variance=0.1,
                size_variance=0.2):
    """The reference's MatchPrior for one image: (gt_locations, labels)."""
    ious = _iou(gt_boxes.unsqueeze(0), corner_priors.unsqueeze(1))  # [P, n]
    best_target, best_target_index = ious.max(1)
    _, best_prior_index = ious.max(0)
    for target_index, prior_index in enumerate(best_prior_index):
        best_target_index[prior_index] = target_index
    best_target.index_fill_(0, best_prior_index, 2)
    labels = gt_labels[best_target_index]
    labels[best_target < iou_threshold] = 0
    return _encode(gt_boxes[best_target_index], priors, center_variance, size_variance), labels


def match_prior_batched(priors, corner_priors, gt_boxes, gt_labels, gt_counts, iou_threshold=0.5):
    """The same for a padded batch [B, T, 4] in one go (padding masked out);
    an image without a box gets labels 0 and offsets 0."""
    import torch
    b, t, _ = gt_boxes.shape
    p = priors.shape[0]
    valid = torch.arange(t, device=gt_boxes.device)[None, :] < gt_counts[:, None].long()  # [B, T]
    boxes = torch.where(valid[..., None], gt_boxes, torch.zeros_like(gt_boxes))
    ious = _iou(boxes[:, None, :, :], corner_priors[None, :, None, :])  # [B, P, T]
    ious = torch.where(valid[:, None, :], ious, torch.full_like(ious, -1.0))
    best_target, best_target_index = ious.max(2)  # [B, P]
    _, best_prior_index = ious.max(1)  # [B, T]
    # Forced matches: the last box whose best prior is p wins p.
    hits = (best_prior_index[:, None, :] == torch.arange(p, device=gt_boxes.device)[None, :, None]) & valid[:, None, :]
    last = torch.where(hits, torch.arange(t, device=gt_boxes.device)[None, None, :], torch.full_like(best_prior_index[:, None, :], -1)).max(2).values
    forced = last >= 0
    best_target_index = torch.where(forced, last, best_target_index)
    best_target = torch.where(forced, torch.full_like(best_target, 2.0), best_target)
    labels = torch.gather(gt_labels, 1, best_target_index)
    labels = torch.where(best_target < iou_threshold, torch.zeros_like(labels), labels)
    matched = torch.gather(boxes, 1, best_target_index[..., None].expand(b, p, 4))
    locations = _encode(matched, priors[None])
    empty = ~valid.any(1)
    labels = torch.where(empty[:, None], torch.zeros_like(labels), labels)
    locations = torch.where(empty[:, None, None], torch.zeros_like(locations), locations)
    return locations, labels


def draw_boxes(b, t, seed, device="cpu"):
    """A padded batch: image i has between t/4 and 3t/4 boxes of random size."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(t // 4, t // 4 + t // 2 + 1, (b,), generator=gen, dtype=torch.int32)
    wh = 0.02 + 0.5 * torch.rand(b, t, 2, generator=gen)
    xy = (1 - wh) * torch.rand(b, t, 2, generator=gen)
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(1, 21, (b, t), generator=gen)
    return boxes.to(device), labels.to(device), counts.to(device)


def assign_check(out):
    import torch
    ok = True
    for name in ("ssdlite300", "ssd300"):
        priors = ssd_priors(name)
        corners = _corners(priors)
        boxes, labels, counts = draw_boxes(4, 20, seed=5)
        counts[1] = 0
        loc, lab = match_prior_batched(priors, corners, boxes, labels, counts)
        good = True
        for i in range(4):
            n = int(counts[i])
            if n == 0:
                good &= bool((lab[i] == 0).all()) and bool((loc[i] == 0).all())
                continue
            l1, lab1 = match_prior(priors, corners, boxes[i, :n], labels[i, :n])
            good &= torch.equal(lab1, lab[i]) and bool(torch.allclose(l1, loc[i], rtol=1e-6, atol=1e-6))
        ok &= good
        log(f"assign check {name:10} {'ok' if good else 'FAILED'}: batched MatchPrior vs per image")
        out.write(json.dumps({"kind": "assign_compare", "priors": name, "ok": good}) + "\n")
    return ok


def assign_timing(args, out, deadline):
    import torch
    ok = True
    cases = ASSIGN_CASES[:1] if args.quick else ASSIGN_CASES
    gpu = torch.cuda.is_available()
    for name, b, t in cases:
        priors = ssd_priors(name)
        corners = _corners(priors)
        boxes, labels, counts = draw_boxes(b, t, seed=b + t)
        rec = {"kind": "assign_time", "assign_case": name, "batch": b, "priors": priors.shape[0], "max_boxes": t}
        if deadline - time.monotonic() < 10:
            rec["skipped"] = "time budget spent"
            out.write(json.dumps(rec) + "\n")
            continue
        try:
            # Per image on the CPU, as a data loader worker: the median image, times B.
            per_image = []
            for i in range(min(b, 8 if args.quick else 32)):
                n = int(counts[i])
                t0 = time.perf_counter()
                match_prior(priors, corners, boxes[i, :n], labels[i, :n])
                per_image.append(time.perf_counter() - t0)
            rec["cpu_per_image_us"] = 1e6 * statistics.median(per_image)
            rec["cpu_batch_us"] = rec["cpu_per_image_us"] * b
            line = f"assign {name:10} B={b:<3} T={t:<3}: CPU per image {rec['cpu_per_image_us']:9.1f} us"
            if gpu:
                dev = [x.cuda() for x in (priors, corners, boxes, labels, counts)]
                fn = lambda: match_prior_batched(*dev)  # noqa: E731
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                n = 5 if args.quick else 30
                events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
                events[0].record()
                for k in range(n):
                    fn()
                    events[k + 1].record()
                torch.cuda.synchronize()
                rec["gpu_batched_us"] = statistics.median(1e3 * x.elapsed_time(y) for x, y in zip(events, events[1:]))
                line += f"; GPU batched {rec['gpu_batched_us']:9.1f} us"
                rec["device"] = torch.cuda.get_device_properties(0).name
            log(line)
        except Exception as e:  # noqa: BLE001 - report and go on
            ok = False
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"assign {name} B={b} T={t}: FAILED {rec['error']}")
        finally:
            if gpu:
                torch.cuda.empty_cache()
        out.write(json.dumps(rec) + "\n")
        out.flush()
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.devnull, help="JSON lines file")
    ap.add_argument("--compare", help="the bench_compare binary (built by scripts/gpu-check --build)")
    ap.add_argument("--lib", help="libmultibox.so for our PyTorch op (sets MULTIBOX_LIB; default: the "
                                  "installed package's, or $MULTIBOX_LIB)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="one shape, few calls")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--compile-dtypes", default="f16",
                    help=f"comma-separated, of {','.join(DTYPES)}: the input types timed under torch.compile")
    args = ap.parse_args()
    args.compile_dtypes = [d for d in args.compile_dtypes.split(",") if d]
    unknown = set(args.compile_dtypes) - set(DTYPES)
    if unknown:
        ap.error(f"--compile-dtypes: unknown {sorted(unknown)}; known: {DTYPES}")
    deadline = time.monotonic() + args.budget
    try:
        import torch
    except ImportError as e:
        log(f"skipped: PyTorch is not installed here ({e})")
        with open(args.out, "a") as out:
            out.write(json.dumps({"kind": "skipped", "reason": f"no PyTorch: {e}"}) + "\n")
        return 3
    log(f"PyTorch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    mb, args.mb_error = load_multibox_torch(args.lib)
    log(f"our op: {mb.library_path() if mb else 'not available: ' + args.mb_error}")
    with open(args.out, "a") as out:

        def part(name, fn, *part_args):
            """One part; an exception in it is logged and recorded, and the
            next part runs."""
            try:
                good = fn(*part_args)
            except Exception as e:  # noqa: BLE001 - report, then the next part
                traceback.print_exc()
                log(f"{name} FAILED: {type(e).__name__}: {e}")
                out.write(json.dumps({"kind": "error", "part": name, "error": f"{type(e).__name__}: {e}"[:500]})
                          + "\n")
                good = False
            out.flush()
            return good

        ok = part("check", check, args, out)
        ok &= part("nvidia check", nvidia_check, args, out, mb)
        ok &= part("assignment check", assign_check, out)
        # The assignment's timing is short; the loss's torch.compile may use
        # the rest of the budget.
        ok &= part("assignment timing", assign_timing, args, out, deadline)
        ok &= part("timing", timing, args, out, deadline, mb)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
