#!/usr/bin/env python3
"""The closing table of scripts/gpu-check (standard library only).

    scripts/gpu_check_table.py --status STATUS.tsv --bench BENCH.jsonl --pytorch PYTORCH.jsonl

STATUS.tsv: one `stage<TAB>result<TAB>detail` line per stage, as gpu-check
writes it. BENCH.jsonl: benches/gpu.rs's records (MULTIBOX_BENCH_OUT).
PYTORCH.jsonl: scripts/pytorch_baseline.py's records. Missing files and
missing cases print as n/a. The format is described in bench/results.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import DTYPES, SHAPES  # noqa: E402 - no torch needed


def read_jsonl(path):
    records = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return records


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--status")
    ap.add_argument("--bench")
    ap.add_argument("--pytorch")
    args = ap.parse_args()

    stages = []
    if args.status and os.path.exists(args.status):
        with open(args.status) as f:
            stages = [line.rstrip("\n").split("\t", 2) for line in f if line.strip()]
    bench = {(r["case"], r["batch"], r["dtype"]): r
             for r in read_jsonl(args.bench) if "case" in r and "call_us" in r}
    torch_times = {}
    compare = []
    nvidia_compare = []
    for r in read_jsonl(args.pytorch):
        if r.get("kind") == "time" and "case" in r:
            torch_times[(r["impl"], r["case"], r["batch"], r["dtype"])] = r
        elif r.get("kind") == "compare" and "case" in r:
            compare.append(r)
        elif r.get("kind") == "nvidia_compare" and "case" in r:
            nvidia_compare.append(r)

    device = next((r.get("device") for r in bench.values()), None)
    copy_gbps = next((r.get("copy_gbps") for r in bench.values() if r.get("copy_gbps")), None)
    print("== gpu-check: stages ==")
    for stage in stages:
        stage += [""] * (3 - len(stage))
        print(f"  {stage[0]:<28} {stage[1]:<9} {stage[2]}")
    if compare:
        bad = [r["case"] for r in compare if not r.get("ok")]
        print(f"  {'losses vs PyTorch f64':<28} {'ok' if not bad else 'FAILED':<9} "
              f"{len(compare) - len(bad)}/{len(compare)} cases within 1e-5"
              + (f"; failed: {', '.join(bad)}" if bad else ""))
    if nvidia_compare:
        bad = [r["case"] for r in nvidia_compare if not r.get("ok")]
        print(f"  {'NVIDIA loss vs ours':<28} {'ok' if not bad else 'FAILED':<9} "
              f"{len(nvidia_compare) - len(bad)}/{len(nvidia_compare)} cases (loss 1e-5, gradients)"
              + (f"; failed: {', '.join(bad)}" if bad else ""))

    header = (f"{'shape':<13} {'B':>4} {'P':>5} {'C':>3} {'dtype':<5} | {'ours us':>8} "
              f"{'graph us':>8} {'op us':>8} | {'eager us':>9} {'compile us':>10} | {'eager/op':>8} "
              f"{'compile/op':>10} | {'% peak':>6} {'% copy':>6}")
    print()
    print(f"== forward+backward, median device time per call"
          f" ({device or 'no GPU run'}) ==")
    print("% peak / % copy: the bytes a call must move, at the better of the two times, against the "
          "datasheet bandwidth / a measured device-to-device copy"
          + (f" ({copy_gbps:.0f} GB/s)" if copy_gbps else "") + "; * launch-bound: a graph replay is under 0.8 of a call")
    print(header)
    print("-" * len(header))
    for dtype in DTYPES:
        for (name, b, p, c) in SHAPES:
            ours = bench.get((name, b, dtype), {})
            eager = torch_times.get(("eager", name, b, dtype), {})
            comp = torch_times.get(("compile", name, b, dtype), {})
            op_us = torch_times.get(("ours_op", name, b, dtype), {}).get("us")
            call_us = ours.get("call_us")
            graph_us = ours.get("graph_us")
            mark = "*" if ours.get("launch_bound") else " "
            print(f"{name:<13} {b:>4} {p:>5} {c:>3} {dtype:<5} |{mark}{fmt(call_us, '8.1f'):>8} "
                  f"{fmt(graph_us, '8.1f'):>8} {fmt(op_us, '8.1f'):>8} | {fmt(eager.get('us'), '9.1f'):>9} "
                  f"{fmt(comp.get('us'), '10.1f'):>10} | "
                  f"{fmt(ratio(eager.get('us'), op_us), '8.1f'):>8} "
                  f"{fmt(ratio(comp.get('us'), op_us), '10.1f'):>10} | "
                  f"{fmt(ours.get('peak_pct'), '6.1f'):>6} {fmt(ours.get('copy_pct'), '6.1f'):>6}")
    sanitizers = [s for s in stages if s[0].startswith("sanitizer")]
    summary = ", ".join(f"{s[0].split(' ', 1)[-1]} {s[1]}" + ("" if s[1] == "0" else f" ({s[2]})")
                        for s in sanitizers) or "n/a"
    print("-" * len(header))
    print(f"sanitizer errors (goldens): {summary}")

    # The bench's graph replays of each half apart: the forward (the row
    # walk and the selection) and the backward (the gradients).
    split = [(name, b, p, c, dtype, bench[(name, b, dtype)]) for dtype in DTYPES for (name, b, p, c) in SHAPES
             if bench.get((name, b, dtype), {}).get("forward_graph_us") is not None]
    if split:
        print()
        print("== forward and backward apart, one graph replay each, median device time ==")
        split_header = (f"{'shape':<13} {'B':>4} {'P':>5} {'C':>3} {'dtype':<5} | {'graph us':>8} | "
                        f"{'fwd us':>8} {'bwd us':>8}")
        print(split_header)
        print("-" * len(split_header))
        for (name, b, p, c, dtype, ours) in split:
            print(f"{name:<13} {b:>4} {p:>5} {c:>3} {dtype:<5} | {fmt(ours.get('graph_us'), '8.1f'):>8} | "
                  f"{fmt(ours.get('forward_graph_us'), '8.1f'):>8} {fmt(ours.get('backward_graph_us'), '8.1f'):>8}")

    # NVIDIA's SSD loss (channel-major, per image) against our op with the
    # same semantics on the same inputs, eager PyTorch calls, and NVIDIA's
    # under torch.compile (scripts/pytorch_baseline.py, impls "nvidia",
    # "ours_channel_major" and "nvidia_compile").
    if any(k[0] in ("nvidia", "ours_channel_major") for k in torch_times):
        print()
        print("== NVIDIA's SSD loss vs our op (layout=channel_major, normalizer=per_image), "
              "forward+backward, median device time ==")
        nv_header = (f"{'shape':<13} {'B':>4} {'P':>5} {'C':>3} {'dtype':<5} | {'ours op us':>10} "
                     f"{'NVIDIA us':>10} {'compiled':>10} | {'NVIDIA/ours':>11} {'comp/ours':>9}")
        print(nv_header)
        print("-" * len(nv_header))
        for dtype in DTYPES:
            for (name, b, p, c) in SHAPES:
                ours = torch_times.get(("ours_channel_major", name, b, dtype), {}).get("us")
                nv = torch_times.get(("nvidia", name, b, dtype), {}).get("us")
                nvc = torch_times.get(("nvidia_compile", name, b, dtype), {}).get("us")
                print(f"{name:<13} {b:>4} {p:>5} {c:>3} {dtype:<5} | {fmt(ours, '10.1f'):>10} "
                      f"{fmt(nv, '10.1f'):>10} {fmt(nvc, '10.1f'):>10} | {fmt(ratio(nv, ours), '11.1f'):>11} "
                      f"{fmt(ratio(nvc, ours), '9.1f'):>9}")

    # Target assignment: ours (benches/gpu.rs, `assign_case` records) against
    # the reference MatchPrior per image on the CPU and batched on the GPU
    # (scripts/pytorch_baseline.py, kind "assign_time").
    ours_assign = {(r["assign_case"], r["batch"], r["max_boxes"]): r
                   for r in read_jsonl(args.bench) if "assign_case" in r and "call_us" in r}
    torch_assign = {(r["assign_case"], r["batch"], r["max_boxes"]): r
                    for r in read_jsonl(args.pytorch) if r.get("kind") == "assign_time"}
    header = (f"{'priors':<11} {'B':>4} {'T':>4} | {'ours us':>8} {'graph us':>8} | "
              f"{'torch GPU us':>12} {'CPU/image us':>12} {'CPU/batch us':>12} | {'GPU/ours':>8}")
    print()
    print("== target assignment, median device time per batch ==")
    print(header)
    print("-" * len(header))
    for priors in ("ssdlite300", "ssd300"):
        for b in (32, 256):
            for t in (20, 100):
                ours = ours_assign.get((priors, b, t), {})
                ref = torch_assign.get((priors, b, t), {})
                print(f"{priors:<11} {b:>4} {t:>4} | {fmt(ours.get('call_us'), '8.1f'):>8} "
                      f"{fmt(ours.get('graph_us'), '8.1f'):>8} | {fmt(ref.get('gpu_batched_us'), '12.1f'):>12} "
                      f"{fmt(ref.get('cpu_per_image_us'), '12.1f'):>12} {fmt(ref.get('cpu_batch_us'), '12.1f'):>12} | "
                      f"{fmt(ratio(ref.get('gpu_batched_us'), ours.get('call_us')), '8.1f'):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
