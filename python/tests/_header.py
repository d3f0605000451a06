"""Small C programs against include/multibox.h, compiled and run with the
system C compiler, for the ctypes bindings' tests (test_*_ctypes.py) to hold
the bindings to the header."""

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_c(body):
    """Compiles ``main`` with the statements ``body`` against the header
    ($CC, else cc), runs it and returns its output. Without a compiler (a
    GPU machine may have none) the test is skipped under pytest; run as a
    script, the file stops with the reason."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        why = f"no C compiler ({cc}) to compile include/multibox.h with"
        try:
            import pytest
        except ImportError:
            raise SystemExit(why) from None
        pytest.skip(why)
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "multibox.h"', "int main(void) {"]
    lines += body + ["return 0; }"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "header.c"
        exe = Path(tmp) / "header"
        src.write_text("\n".join(lines))
        subprocess.run([cc, "-I", str(ROOT / "include"), str(src), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def check_struct_layouts(structs):
    """Each ctypes Structure of ``structs`` (the header's name -> class) has
    the size and field offsets the C compiler gives the header's struct."""
    body = []
    for cname, cls in structs.items():
        body.append(f'printf("{cname} size %zu\\n", sizeof({cname}));')
        for field, _ in cls._fields_:
            body.append(f'printf("{cname} {field} %zu\\n", offsetof({cname}, {field}));')
    for line in run_c(body).splitlines():
        cname, what, value = line.split()
        cls = structs[cname]
        got = ctypes.sizeof(cls) if what == "size" else getattr(cls, what).offset
        assert got == int(value), f"{cname}.{what}: ctypes {got}, C {value}"
