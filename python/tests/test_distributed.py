"""Data-parallel training with ``torch.distributed``: two processes each take
half of a batch, all-reduce their positive counts and pass the sum as the
loss's divisor (``normalizer=count``). SPEC.md, "Normalisation": mining is
per image, so the ranks' gradients, concatenated, are the single-process
gradients of the whole batch, and their losses sum to its loss.

Then under ``DistributedDataParallel`` (a small linear head in float64
whose outputs feed the loss channel-major): DDP averages the parameter
gradients over the W ranks, so the global count gives 1/W of the
single-process gradient, while the mean count (N / W, mmdetection's
``reduce_mean``), the global count with the loss times W, and
``normalizer="per_image"`` each give it exactly. README, "Data-parallel
training"; python/examples/ddp_step.py is the same step as a script.

gloo on CPU tensors always; NCCL on CUDA tensors where there is CUDA (one
GPU per rank, or both ranks on GPU 0 where NCCL accepts that: it usually
refuses, and the test then skips saying so). One spawn per backend serves
every test of that backend.
"""

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from multibox_torch import multibox_loss

WORLD = 2
B, P, C, F = 4, 300, 21, 8  # images, priors, classes, head features
G_REG, G_CLS = 0.75, 2.5  # loss weights: the upstream gradients
# SPEC.md, "Precision": losses relative 1e-6, f32 gradients 1e-6 of the
# largest gradient.
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-6
# The DDP variants: (normalizer, factor on the loss, expected DDP gradient
# as a multiple of the single-process one).
DDP_VARIANTS = {
    "global_count": ("count", 1.0, 1.0 / WORLD),
    "global_count_times_world": ("count", float(WORLD), 1.0),
    "mean_count": ("mean_count", 1.0, 1.0),
    "per_image": ("per_image", 1.0, 1.0),
}
# The ranks take a few seconds (each process imports PyTorch); a hang (NCCL
# with two ranks on one GPU, say) must not eat the GPU check's budget, which
# shortens the wait with MULTIBOX_SPAWN_TIMEOUT_S.
SPAWN_TIMEOUT_S = float(os.environ.get("MULTIBOX_SPAWN_TIMEOUT_S", "60"))


def make_batch():
    """The whole batch, on the CPU: logits, offsets, targets, ~12 % positives,
    a few ignored priors, and image 3 (rank 1's second) without a positive;
    head features in float64."""
    g = torch.Generator().manual_seed(1234)
    confidence = torch.randn(B, P, C, generator=g) * 2
    locations = torch.randn(B, P, 4, generator=g)
    gt = torch.randn(B, P, 4, generator=g)
    labels = torch.randint(1, C, (B, P), generator=g)
    u = torch.rand(B, P, generator=g)
    labels[u < 0.85] = 0
    labels[u > 0.97] = -1
    labels[3].clamp_(max=0)
    features = torch.randn(B, P, F, generator=g, dtype=torch.float64)
    return {"confidence": confidence, "locations": locations, "gt": gt, "labels": labels, "features": features}


def make_head(device):
    """The same initial head in every process: features -> C logits and 4
    offsets per prior. Float64, so that the head's own sums add nothing
    that the comparison would have to allow for."""
    gen = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(F, C + 4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C + 4, F, generator=gen, dtype=torch.float64) * 0.5)
        head.bias.copy_(torch.randn(C + 4, generator=gen, dtype=torch.float64) * 0.1)
    return head.to(device)


def head_outputs(head, features):
    """Channel-major outputs as an SSD head concatenates them: [b, C, P]
    logits and [b, 4, P] offsets, float32 for the loss."""
    out = head(features).transpose(1, 2).float()
    return out[:, :C], out[:, C:]


def plain_step(batch, device, normalizer):
    """The loss and its gradients on ``batch`` (row-major leaf tensors)."""
    conf = batch["confidence"].to(device).requires_grad_()
    loc = batch["locations"].to(device).requires_grad_()
    reg, cls, num_pos = multibox_loss(conf, loc, batch["labels"].to(device), batch["gt"].to(device),
                                      normalizer=normalizer)
    (G_REG * reg + G_CLS * cls).backward()
    return {"reg": reg.detach().cpu(), "cls": cls.detach().cpu(), "num_pos": num_pos.cpu(),
            "d_conf": conf.grad.cpu(), "d_loc": loc.grad.cpu()}


def head_step(head, batch, device, normalizer, factor=1.0):
    """The head's parameter gradients through the loss, channel-major."""
    conf, loc = head_outputs(head, batch["features"].to(device))
    gt = batch["gt"].to(device).transpose(1, 2)
    reg, cls, _ = multibox_loss(conf, loc, batch["labels"].to(device), gt, normalizer=normalizer,
                                layout="channel_major")
    (factor * (G_REG * reg + G_CLS * cls)).backward()


def _worker(rank, backend, store, out_dir):
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            device = torch.device("cuda", rank if torch.cuda.device_count() >= WORLD else 0)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
        whole = make_batch()
        part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        batch = {k: v[part] for k, v in whole.items()}
        result = {"device": str(device), "ddp": {}}

        # Each rank counts its positives (known before the loss runs) and
        # all-reduces the count on its device, asynchronously: other work
        # could run until wait(), which (on CUDA) only makes the current
        # stream wait for the collective; the kernels read the sum there.
        count = (batch["labels"].to(device) > 0).sum()
        local = count.clone()
        work = dist.all_reduce(count, async_op=True)
        work.wait()
        result["local_count"], result["global_count"] = local.cpu(), count.cpu()
        result["plain"] = plain_step(batch, device, normalizer=count)

        for name, (normalizer, factor, _) in DDP_VARIANTS.items():
            head = make_head(device)
            ddp = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
            n = {"count": count, "mean_count": count / WORLD, "per_image": "per_image"}[normalizer]
            head_step(ddp, batch, device, n, factor)
            result["ddp"][name] = {k: p.grad.cpu() for k, p in head.named_parameters()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(backend, tmp):
    """Runs the two ranks; returns their results, or (None, why) when they
    failed (their tracebacks)."""
    ctx = mp.start_processes(_worker, args=(backend, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                return None, f"the ranks did not finish within {SPAWN_TIMEOUT_S:g} s"
    except Exception as e:  # ProcessRaisedException / ProcessExitedException
        errors = "\n".join(p.read_text() for p in sorted(tmp.glob("rank*.err")))
        return None, errors or str(e)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], None


BACKENDS = [
    pytest.param("gloo", id="gloo-cpu"),
    pytest.param(
        "nccl",
        id="nccl-cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or not dist.is_nccl_available(),
            reason="NCCL variant: no CUDA device" if not torch.cuda.is_available()
            else "NCCL variant: this PyTorch has no NCCL",
        ),
    ),
]


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request, tmp_path_factory):
    """(backend, device, the ranks' results, the single-process results)."""
    backend = request.param
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        pytest.skip(f"torch.distributed with {backend} is not available in this PyTorch")
    tmp = tmp_path_factory.mktemp(backend)
    results, why = _spawn(backend, tmp)
    if results is None:
        shared = backend == "nccl" and torch.cuda.device_count() < WORLD
        refused = ("Duplicate GPU", "ncclInvalidUsage", "invalid usage", "did not finish within")
        if shared and any(text in why for text in refused):
            last = [line for line in why.splitlines() if line.strip()][-1][:300]
            pytest.skip(
                f"NCCL variant: {torch.cuda.device_count()} GPU here, and NCCL refused two ranks on one GPU "
                f"({last}); it runs with one GPU per rank on a machine with {WORLD} or more"
            )
        pytest.fail(f"the {backend} ranks failed:\n{why}")
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    whole = make_batch()
    single = {"plain": plain_step(whole, device, normalizer=None)}
    for name, (normalizer, _, _) in DDP_VARIANTS.items():
        head = make_head(device)
        head_step(head, whole, device, "per_image" if normalizer == "per_image" else None)
        single[name] = {k: p.grad.cpu() for k, p in head.named_parameters()}
    return backend, device, results, single


def assert_loss(got, want):
    got, want = float(got), float(want)
    assert abs(got - want) <= LOSS_RTOL * max(abs(want), 1e-30), (got, want)


def assert_grad(got, want):
    assert got.shape == want.shape
    scale = want.abs().max().double().clamp(min=1e-30)
    err = ((got.double() - want.double()).abs().max() / scale).item()
    assert err <= GRAD_TOL, err


def test_the_count_is_all_reduced(ranks):
    _, _, results, single = ranks
    local = [int(r["local_count"]) for r in results]
    assert local[1] > 0 and sum(local) == int(single["plain"]["num_pos"])
    for r in results:
        assert int(r["global_count"]) == sum(local)
        # num_pos is always the rank's own count.
        assert int(r["plain"]["num_pos"]) == int(r["local_count"])


def test_ranks_with_the_global_count_make_the_single_process_loss(ranks):
    _, _, results, single = ranks
    want = single["plain"]
    assert_loss(sum(r["plain"]["reg"].double() for r in results), want["reg"])
    assert_loss(sum(r["plain"]["cls"].double() for r in results), want["cls"])
    assert_grad(torch.cat([r["plain"]["d_conf"] for r in results]), want["d_conf"])
    assert_grad(torch.cat([r["plain"]["d_loc"] for r in results]), want["d_loc"])


@pytest.mark.parametrize("variant", list(DDP_VARIANTS))
def test_ddp_parameter_gradients(ranks, variant):
    # DDP leaves every rank with the same averaged gradients: the
    # single-process ones (times 1/W with the global count alone).
    _, _, results, single = ranks
    scale = DDP_VARIANTS[variant][2]
    for name, want in single[variant].items():
        got = [r["ddp"][variant][name] for r in results]
        assert torch.equal(got[0], got[1]), name
        assert_grad(got[0], want * scale)


def test_spawned_ranks_saw_the_backend_device(ranks):
    backend, device, results, _ = ranks
    if backend == "gloo":
        assert all(r["device"] == "cpu" for r in results)
    else:
        want = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= WORLD else ["cuda:0", "cuda:0"]
        assert [r["device"] for r in results] == want


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-rs"] + sys.argv[1:]))


@pytest.mark.parametrize(("normalizer", "expected_ratio"),
                         [("mean_count", 1.0), ("global_count", 1.0 / WORLD), ("per_image", 1.0)])
def test_the_ddp_example_runs_and_its_check_holds(normalizer, expected_ratio):
    # python/examples/ddp_step.py, as README's "Data-parallel training" runs
    # it: two gloo ranks spawned by the script, one step, --check (which
    # exits with an error when the DDP gradient is not `expected_ratio`
    # times the single-process one).
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this PyTorch")
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_step.py"
    run = subprocess.run(
        [sys.executable, str(script), "--steps", "1", "--check", "--normalizer", normalizer],
        capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    checks = [line for line in run.stdout.splitlines() if line.startswith("check ")]
    assert checks, run.stdout
    for line in checks:
        ratio = float(line.split("= ")[1].split(" ")[0])
        assert abs(ratio - expected_ratio) <= 1e-5, line
    assert "step 0: loss" in run.stdout
