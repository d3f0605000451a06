#!/usr/bin/env python3
"""Data-parallel training steps with the multibox loss under
DistributedDataParallel: each rank counts its positives, all-reduces the
count asynchronously, and divides its loss by the mean count.

    python python/examples/ddp_step.py                 # spawns 2 ranks itself
    torchrun --nproc_per_node 2 python/examples/ddp_step.py
    python python/examples/ddp_step.py --normalizer per_image --check

On CPU tensors with gloo; with --device cuda, NCCL and one GPU per rank.
The model is a stand-in for an SSD head (one linear layer per prior on
random features, outputs concatenated channel-major as NVIDIA's SSD
concatenates its heads); the data is random. --check compares the first
step's DDP gradient with the single-process gradient of the whole batch on
rank 0, and exits with an error when they differ.

Why the mean count (README, "Data-parallel training"): the single-process
loss divides the batch's sums by N, the batch's positive count. With W
ranks each holding B / W images:

- Dividing each rank's sums by its own count N_r (the default normaliser)
  weights the ranks' positives unequally: not the single-process loss.
- Dividing by the global count N = sum_r N_r makes the ranks' losses add up
  to the single-process loss, and their gradients with respect to their
  own inputs are exactly the single-process ones. But DDP *averages* the
  parameter gradients over the W ranks (it divides their sum by W), so the
  parameter gradient is 1/W of the single-process one: as if the learning
  rate were divided by W.
- Dividing by the mean count N / W (mmdetection's ``reduce_mean``) makes
  each rank's loss W times the previous one, and DDP's average of W such
  gradients is exactly the single-process gradient. (Equivalently: the
  global count with the loss multiplied by W.)

The count needs no host round trip: ``(labels > 0).sum()`` is a tensor on
the labels' device, ``all_reduce(..., async_op=True)`` queues the sum,
``wait()`` makes the current stream wait for it (on CUDA; on CPU it
blocks), and the loss's kernels read the divisor in device memory.

``normalizer="per_image"`` (NVIDIA's recipe: each image's sums over its own
positives, averaged over the images) needs no all-reduce at all: each rank
averages over its B / W images and DDP averages the W ranks, which is the
mean over all B images when the ranks hold equal numbers of images.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from multibox_torch import multibox_loss

PRIORS, CLASSES, FEATURES = 3000, 21, 32
CHECK_TOLERANCE = 1e-5  # --check: of the largest single-process gradient


def make_model(seed=0):
    """A stand-in head: features [b, P, F] -> logits and offsets per prior."""
    torch.manual_seed(seed)
    return torch.nn.Linear(FEATURES, CLASSES + 4)


def head(model, features):
    """[b, C, P] logits and [b, 4, P] offsets (channel-major)."""
    out = model(features).transpose(1, 2)
    return out[:, :CLASSES], out[:, CLASSES:]


def make_batch(batch, seed):
    """Random features and targets for the whole batch: ~2 % positives,
    some ignored priors; gt offsets channel-major [B, 4, P]."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, PRIORS, FEATURES, generator=g)
    labels = torch.randint(1, CLASSES, (batch, PRIORS), generator=g)
    u = torch.rand(batch, PRIORS, generator=g)
    labels[u < 0.98] = 0
    labels[u > 0.995] = -1
    gt = torch.randn(batch, 4, PRIORS, generator=g)
    return features, labels, gt


def divisor(labels, world, mode):
    """The loss's ``normalizer`` for this rank's labels."""
    if mode == "per_image":
        return "per_image"
    count = (labels > 0).sum()  # on the labels' device; no host copy
    work = dist.all_reduce(count, async_op=True)  # queued on the collective's stream
    # ... anything that does not need the count could run here ...
    work.wait()  # the current stream waits for the sum; the host does not
    if mode == "mean_count":
        # DDP averages gradients over the world: dividing by N / W instead of
        # N makes that average the single-process gradient.
        return count / world
    # The global count: the ranks' losses sum to the single-process loss,
    # but DDP's average leaves 1/W of its gradient (multiply the loss by W
    # to undo that).
    return count


def step_loss(model, features, labels, gt, normalizer):
    confidence, locations = head(model, features)
    reg, cls, num_pos = multibox_loss(confidence, locations, labels, gt, normalizer=normalizer,
                                      layout="channel_major")
    return reg + cls, num_pos


def run(rank, world, local_rank, args):
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = make_model().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    per_rank = args.batch // world
    for step in range(args.steps):
        features, labels, gt = make_batch(args.batch, seed=step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's images
        features, labels, gt = features[part].to(device), labels[part].to(device), gt[part].to(device)
        normalizer = divisor(labels, world, args.normalizer)
        loss, num_pos = step_loss(ddp, features, labels, gt, normalizer)
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces (averages) the parameter gradients here
        if step == 0 and args.check and rank == 0:
            check_first_step(model, world, args)
        optimizer.step()
        # Logging reads the loss back; a training loop would do so rarely.
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            if args.normalizer == "global_count":
                what, value = "sum of the ranks' losses", total.item()
            else:
                what, value = "mean of the ranks' losses", total.item() / world
            print(f"step {step}: loss {value:.6f} (the {what}), rank 0 has {int(num_pos)} positives", flush=True)


def check_first_step(model, world, args):
    """The DDP gradient (after backward, before the optimiser's step) against
    the single-process gradient of the whole batch: the default normaliser
    (or per_image), the same initial weights. Equal with the mean count and
    per_image; 1/W of it with the global count."""
    device = next(model.parameters()).device
    single = make_model().to(device)
    features, labels, gt = (t.to(device) for t in make_batch(args.batch, seed=0))
    loss, _ = step_loss(single, features, labels, gt, "per_image" if args.normalizer == "per_image" else None)
    loss.backward()
    scale = 1.0 / world if args.normalizer == "global_count" else 1.0
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        ratio = (p.grad.double().norm() / q.grad.double().norm()).item()
        err = ((p.grad - q.grad * scale).abs().max() / q.grad.abs().max()).item()
        worst = max(worst, err)
        print(f"check {name}: |DDP grad| / |single-process grad| = {ratio:.6f} (expected {scale:g}); "
              f"largest difference {err:.1e} of the largest gradient", flush=True)
    # float32 sums in another order: a few ulps of the largest gradient.
    if not worst <= CHECK_TOLERANCE:
        raise SystemExit(f"check FAILED: the DDP gradient is {worst:.1e} of the largest gradient away "
                         f"from {scale:g} times the single-process one (tolerance {CHECK_TOLERANCE:g})")


def worker(rank, world, args, store):
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run(rank, world, rank, args)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world-size", type=int, default=2, help="ranks to spawn (without torchrun)")
    ap.add_argument("--batch", type=int, default=8, help="images in the global batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--normalizer", choices=["mean_count", "global_count", "per_image"], default="mean_count")
    ap.add_argument("--check", action="store_true", help="compare the first step's gradient with one process's")
    args = ap.parse_args()
    args.backend = "nccl" if args.device == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        args.world_size = int(os.environ["WORLD_SIZE"])
        if args.batch % args.world_size:
            sys.exit(f"--batch {args.batch} must be a multiple of the world size {args.world_size}")
        dist.init_process_group(args.backend)  # torchrun's env:// rendezvous
        try:
            run(dist.get_rank(), args.world_size, int(os.environ.get("LOCAL_RANK", 0)), args)
        finally:
            dist.destroy_process_group()
        return
    if args.batch % args.world_size:
        sys.exit(f"--batch {args.batch} must be a multiple of the world size {args.world_size}")
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        # NCCL refuses two ranks on one GPU.
        sys.exit(f"--device cuda needs one GPU per rank: {torch.cuda.device_count()} GPUs, "
                 f"{args.world_size} ranks")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(args.world_size, args, os.path.join(tmp, "store")),
                                    nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
