#!/usr/bin/env python3
"""Random cases in the goldens' formats, for the golden tests to run.

    scripts/random_goldens.py loss DIR [--seed S] [--count N] [--extreme]
    scripts/random_goldens.py targets DIR [--seed S] [--count N]
    MULTIBOX_GOLDENS=DIR cargo test --test goldens -- --nocapture
    MULTIBOX_TARGET_GOLDENS=DIR cargo test --test targets --test emulated_targets

Needs PyTorch and NumPy (the venv of scripts/python-tests has both).

loss: cases in the format of tests/goldens/README.md, with the expected
values computed here, independently of the crate: docs/SPEC.md's algorithm
in float64 autograd on the inputs rounded to their type (keys in float64,
a stable descending sort, `k = floor(f32(ratio) * pos)` exactly). The draws
reach what the committed cases do not: C from 2 to 600 (1,100 with
--extreme), P from 1 to 8,732 and odd, ignored priors, logits of standard
deviation 0.01 to 40 (1e-4 to 1000 with --extreme), rows copied so that
keys tie exactly, images without positives, fractional ratios and ratios
that mine every candidate. Random continuous logits keep clear of float32
rounding ties at the mining boundary, as SPEC.md asks of the goldens; a
case that lands on one fails its mask check and names the prior.

targets: cases in the format of tests/goldens-targets/README.md, labelled by
the reference `MatchPrior` (qfgaohao/pytorch-ssd, float32, per image, as
SPEC.md's "Target assignment" quotes it; scripts/pytorch_baseline.py's): standard SSDLite-300 and SSD300
priors or grids of equal-size priors (many equal ious), boxes equal to a
prior, tiny, partly outside the image or repeated, empty images, settings
other than the defaults. No degenerate box: there the specification, not
the reference, decides.

The same seed gives the same cases.
"""

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pytorch_baseline import _corners, match_prior  # noqa: E402 - the reference's MatchPrior


def f32(x):
    import numpy as np
    return float(np.float32(x))


def mined_count(ratio, pos, candidates):
    """SPEC.md's k_b: floor of the f32 ratio times pos, exactly."""
    return min(math.floor(Fraction(f32(ratio)) * pos), candidates)


def draw_loss_inputs(rng, b, p, c, dtype, std, pos_fraction, ignore_fraction, copy_rows,
                     empty_first, ratio):
    """One draw of a loss case's inputs and its mined set, or None when two
    different keys at some image's mining boundary lie within float32
    rounding of each other (SPEC.md: the goldens keep clear of those)."""
    import torch

    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    t = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    exact = lambda x: x.to(t).to(torch.float64)  # noqa: E731 - the values T holds
    conf = exact(torch.randn(b, p, c, generator=g, dtype=torch.float64) * std)
    loc = exact(torch.randn(b, p, 4, generator=g, dtype=torch.float64))
    gt = exact(torch.randn(b, p, 4, generator=g, dtype=torch.float64))
    u = torch.rand(b, p, generator=g, dtype=torch.float64)
    classes = torch.randint(1, c, (b, p), generator=g)
    labels = torch.where(u < pos_fraction, classes, torch.zeros_like(classes))
    ignored = (u >= pos_fraction) & (u < pos_fraction + ignore_fraction)
    labels = torch.where(ignored, torch.full_like(labels, -1), labels)
    if empty_first:
        labels[0] = torch.where(labels[0] > 0, torch.zeros_like(labels[0]), labels[0])
    if copy_rows and p >= 2:
        # Odd rows repeat the even row before them: keys tie exactly.
        conf[:, 1::2] = conf[:, 0:2 * (p // 2):2]

    pos = labels > 0
    candidates = labels == 0
    lse = torch.logsumexp(conf, dim=2)
    key = (lse - conf[:, :, 0]).masked_fill(~candidates, -math.inf)
    mask = pos.clone()
    for i in range(b):
        k = mined_count(ratio, int(pos[i].sum()), int(candidates[i].sum()))
        if k == 0:
            continue
        keys, order = torch.sort(key[i], descending=True, stable=True)
        mask[i, order[:k]] = True
        if k == int(candidates[i].sum()):
            continue
        # f32 keys carry a few ulps of the larger of logsumexp and x[0].
        scale = max(1.0, float(lse[i][candidates[i]].abs().max()),
                    float(conf[i, :, 0][candidates[i]].abs().max()))
        tol = 16 * 2.0**-24 * scale
        for edge in (keys[k - 1], keys[k]):
            gap = (keys[:int(candidates[i].sum())] - edge).abs()
            if bool(((gap > 0) & (gap <= tol)).any()):
                return None
    conf.requires_grad_(True)
    loc.requires_grad_(True)
    return conf, loc, gt, labels, pos, torch.logsumexp(conf, dim=2), mask


def loss_case(root, name, rng, extreme):
    import numpy as np
    import torch

    cs = ([2, 3, 81, 91, 92, 300, 538, 600, 1000, 1100] if extreme else
          [2, 3, 4, 5, 7, 8, 9, 16, 21, 31, 32, 33, 64, 81, 91, 92, 100, 127, 128, 129, 200, 300, 600])
    ps = [1, 2, 3, 5, 17, 31, 32, 33, 100, 255, 256, 257, 511, 1000, 1500, 3000, 3234, 8732]
    c, p, b = int(rng.choice(cs)), int(rng.choice(ps)), int(rng.integers(1, 5))
    while b * p * c > 2_000_000:
        p = max(1, p // 2)
    dtype = str(rng.choice(["f32", "f16", "bf16"]))
    label_dtype = str(rng.choice(["i64", "i32"]))
    ratio = float(rng.choice([3, 3, 1, 5, 0.5, 2.5, 7, 0.25, 1000]))
    stds = [1e-4, 1.0, 100.0, 1000.0] if extreme else [0.01, 1.0, 1.0, 5.0, 40.0]
    std = float(rng.choice(stds))
    if dtype == "f16":
        std = min(max(std, 1e-3), 1000.0)
    pos_fraction = float(rng.choice([0.0005, 0.02, 0.1, 0.3, 0.9, 1.0, 0.0]))
    ignore_fraction = float(rng.choice([0.0, 0.0, 0.05, 0.3, 0.98]))
    copy_rows = rng.random() < 0.2
    empty_first = b > 1 and rng.random() < 0.3

    drawn = None
    while drawn is None:
        for _ in range(5):
            drawn = draw_loss_inputs(rng, b, p, c, dtype, std, pos_fraction, ignore_fraction,
                                     copy_rows, empty_first, ratio)
            if drawn is not None:
                break
        else:
            std *= 10  # keys this close together cannot keep clear of ties: spread them
    conf, loc, gt, labels, pos, lse, mask = drawn
    n = int(pos.sum())
    ce = lse - conf.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    d = loc - gt
    smooth_l1 = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).sum(2)
    if n > 0:
        reg, cls = (smooth_l1 * pos).sum() / n, (ce * mask).sum() / n
        (reg + cls).backward()
        grad_conf, grad_loc, reg, cls = conf.grad, loc.grad, reg.item(), cls.item()
    else:
        grad_conf, grad_loc, reg, cls = torch.zeros_like(conf), torch.zeros_like(loc), 0.0, 0.0

    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    label_np = np.int64 if label_dtype == "i64" else np.int32
    arrays = {
        "confidence": (conf, np.float32), "locations": (loc, np.float32),
        "labels": (labels, label_np), "gt_locations": (gt, np.float32),
        "mask": (mask, np.uint8), "grad_confidence": (grad_conf, np.float32),
        "grad_locations": (grad_loc, np.float32),
    }
    files = {}
    for key_name, (x, np_type) in arrays.items():
        x.detach().numpy().astype(np_type).tofile(d / f"{key_name}.bin")
        files[key_name] = {"dtype": np.dtype(np_type).name, "shape": list(x.shape)}
    meta = {
        "name": name, "batch": b, "priors": p, "classes": c, "neg_pos_ratio": ratio,
        "input_dtype": dtype, "label_dtype": label_dtype, "num_pos": n,
        "regression_loss": reg, "classification_loss": cls,
        # No float32 run of the reference here: the float64 values stand in.
        "reference_f32_regression_loss": reg, "reference_f32_classification_loss": cls,
        "ties_broken_by_lower_prior_index": bool(copy_rows),
        "note": (f"random: std {std}, positives {pos_fraction}, ignored {ignore_fraction}, "
                 f"copied rows {copy_rows}, first image without positives {empty_first}"),
        "files": files,
    }
    (d / "case.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ targets

def random_priors(rng):
    import numpy as np
    kind = int(rng.integers(0, 3))
    if kind < 2:
        case = ["t_ssdlite_voc", "t_ssd300"][kind]
        return np.fromfile(ROOT / "tests" / "goldens-targets" / case / "priors.bin", np.float32).reshape(-1, 4)
    grid = int(rng.integers(2, 20))
    sizes = rng.uniform(0.05, 0.9, size=int(rng.integers(1, 3)))
    return np.array([[(j + 0.5) / grid, (i + 0.5) / grid, s, s * rng.choice([1.0, 2.0, 0.5])]
                     for i in range(grid) for j in range(grid) for s in sizes], np.float32)


def random_boxes(rng, n, priors):
    import numpy as np
    boxes = []
    for _ in range(n):
        kind = int(rng.integers(0, 6))
        if kind == 0:  # a prior's own box
            cx, cy, w, h = priors[rng.integers(0, len(priors))]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif kind == 1:  # far smaller than any prior
            x, y = rng.uniform(0, 1, 2)
            w = rng.uniform(1e-4, 1e-2)
            box = [x, y, x + w, y + w]
        elif kind == 2:  # partly outside the image
            x, y = rng.uniform(-0.3, 1.0, 2)
            box = [x, y, x + rng.uniform(0.05, 0.8), y + rng.uniform(0.05, 0.8)]
        elif kind == 3 and boxes:  # an earlier box again
            box = list(boxes[rng.integers(0, len(boxes))])
        else:
            x0, x1 = sorted(rng.uniform(0, 1, 2))
            y0, y1 = sorted(rng.uniform(0, 1, 2))
            box = [x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)]
        boxes.append(np.array(box, np.float32))
    return np.array(boxes, np.float32).reshape(-1, 4)


def targets_case(root, name, rng):
    import numpy as np
    import torch
    priors = random_priors(rng)
    p = len(priors)
    b = int(rng.integers(1, 5))
    t = int(rng.choice([1, 2, 5, 20, 64, 100, 130]))
    threshold = f32(rng.choice([0.5, 0.45, 0.3, 1.0, 0.05]))
    center_variance = f32(rng.choice([0.1, 0.2, 1.0]))
    size_variance = f32(rng.choice([0.2, 0.1, 0.5]))
    label_dtype = str(rng.choice(["i64", "i32"]))
    boxes = np.full((b, t, 4), np.nan, np.float32)  # padding: NaN, never read
    box_labels = np.full((b, t), -7, np.int64)
    counts = np.zeros(b, np.int32)
    labels = np.zeros((b, p), np.int64)
    locations = np.zeros((b, p, 4), np.float32)
    for i in range(b):
        n = int(rng.integers(0, t + 1)) if rng.random() < 0.7 else t
        counts[i] = n
        if n == 0:
            continue  # the specification's answer: zeros
        boxes[i, :n] = random_boxes(rng, n, priors)
        box_labels[i, :n] = rng.integers(1, 21, n)
        prior_tensor = torch.from_numpy(priors)
        got_locations, got_labels = match_prior(
            prior_tensor, _corners(prior_tensor), torch.from_numpy(boxes[i, :n]),
            torch.from_numpy(box_labels[i, :n]), threshold, center_variance, size_variance)
        labels[i], locations[i] = got_labels.numpy(), got_locations.numpy()
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    label_np = np.int64 if label_dtype == "i64" else np.int32
    arrays = {"priors": priors, "gt_boxes": boxes, "gt_labels": box_labels.astype(label_np),
              "gt_counts": counts, "labels": labels.astype(label_np), "gt_locations": locations}
    for key, x in arrays.items():
        x.tofile(d / f"{key}.bin")
    meta = {
        "name": name, "batch": b, "priors": p, "max_boxes": t, "iou_threshold": threshold,
        "center_variance": center_variance, "size_variance": size_variance,
        "label_dtype": label_dtype, "num_pos": int((labels > 0).sum()), "note": "random",
        "files": {f"{k}.bin": {"dtype": "f32" if x.dtype == np.float32 else x.dtype.name.replace("int", "i"),
                               "shape": list(x.shape)} for k, x in arrays.items()},
    }
    (d / "case.json").write_text(json.dumps(meta, indent=1))
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["loss", "targets"])
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--extreme", action="store_true",
                        help="loss: wider classes and logits (C to 1,100, std 1e-4 to 1000)")
    args = parser.parse_args()
    try:
        import numpy as np
        import torch  # noqa: F401
    except ImportError as e:
        sys.exit(f"random_goldens.py needs PyTorch and NumPy: {e}")
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        name = f"random_{args.kind}_{args.seed}_{i}"
        meta = (loss_case(args.dir, name, rng, args.extreme) if args.kind == "loss"
                else targets_case(args.dir, name, rng))
        shape = (f"{meta['batch']}x{meta['priors']}x{meta['classes']} {meta['input_dtype']}"
                 if args.kind == "loss" else f"{meta['batch']}x{meta['priors']}, T {meta['max_boxes']}")
        print(f"{name}: {shape}, {meta['num_pos']} positives")


if __name__ == "__main__":
    main()
