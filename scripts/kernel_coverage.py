#!/usr/bin/env python3
"""Coverage of kernels/* from `gcov -j -b` files (scripts/kernel-coverage).

Template instances are merged: a line is covered when any instance ran it,
and a branch (by its index on the line, among instances with as many
branches there) when any instance took it; exception edges are left out.
Then the instances that never ran, and the lines an instance that ran
never ran although others did (most telling in the O0 build, where every
helper is a function of its own).

usage: kernel_coverage.py DIR   (DIR holds the *.gcov.json.gz files)
"""

import collections
import glob
import gzip
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def kernel_files(folder):
    """Each gcov record of a file under kernels/, with its repository path."""
    for path in sorted(glob.glob(os.path.join(folder, "*.gcov.json.gz"))):
        with gzip.open(path) as f:
            for record in json.load(f)["files"]:
                if "/kernels/" in record["file"]:
                    yield "kernels/" + record["file"].split("/kernels/")[1], record


def main(folder):
    count = collections.Counter()  # (file, line) -> runs, over every instance
    branches = collections.defaultdict(dict)  # (file, line) -> {branch count: [taken]}
    instance_runs = collections.Counter()  # (file, line, mangled, demangled) -> runs
    instance_lines = collections.defaultdict(collections.Counter)  # mangled -> (file, line) -> runs
    for name, record in kernel_files(folder):
        for fn in record["functions"]:
            instance_runs[(name, fn["start_line"], fn["name"], fn["demangled_name"])] += fn["execution_count"]
        for line in record["lines"]:
            key = (name, line["line_number"])
            count[key] += line["count"]
            taken = [b["count"] for b in line["branches"] if not b.get("throw")]
            if taken:
                slot = branches[key].setdefault(len(taken), [0] * len(taken))
                for i, c in enumerate(taken):
                    slot[i] += c
            if "function_name" in line:
                instance_lines[line["function_name"]][key] += line["count"]

    sources = {}

    def text(name, number):
        if name not in sources:
            with open(os.path.join(ROOT, name)) as f:
                sources[name] = f.read().split("\n")
        return sources[name][number - 1].strip()[:110]

    print(f"{'file':24} {'lines':>12} {'branches':>16}")
    for name in sorted({n for n, _ in count}):
        keys = [k for k in count if k[0] == name]
        slots = [s for k in keys for s in branches.get(k, {}).values()]
        n_branches = sum(len(s) for s in slots)
        taken = sum(1 for s in slots for c in s if c > 0)
        covered = sum(1 for k in keys if count[k] > 0)
        print(f"{name:24} {covered:5}/{len(keys):<6} {taken:6}/{n_branches:<6} {100 * taken / max(n_branches, 1):5.1f}%")
    for key in sorted(k for k in count if count[k] == 0):
        print(f"line never run {key[0]}:{key[1]}: {text(*key)}")
    for key in sorted(k for k in branches if count[k] > 0):
        untaken = [(n, [i for i, c in enumerate(s) if c == 0]) for n, s in sorted(branches[key].items())]
        # Only where every shape of the line's instances left one untaken.
        if all(idle for _, idle in untaken):
            what = "; ".join(f"{len(idle)}/{n} untaken {idle}" for n, idle in untaken)
            print(f"branch never taken {key[0]}:{key[1]}: {what} | {text(*key)}")

    print("instances never run:")
    for (name, line, _, demangled), runs in sorted(instance_runs.items()):
        if runs == 0:
            print(f"  {name}:{line} {demangled[:200]}")
    ran = {mangled for (_, _, mangled, _), runs in instance_runs.items() if runs > 0}
    mangled = sorted(instance_lines)
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout
    names = dict(zip(mangled, demangled.split("\n")))
    print("lines an instance that ran never ran:")
    for fn in sorted(instance_lines, key=lambda m: names[m]):
        idle = sorted(k for k, runs in instance_lines[fn].items() if runs == 0)
        if fn in ran and idle:
            print(f"  {names[fn][:140]}: " + ", ".join(f"{n}:{l}" for n, l in idle))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
