"""The CPU allocator setting of the training stages (``manyways.training.keep_cpu_allocations``).

Observed through glibc's own accounting (``mallinfo2``): with glibc defaults a 64 MiB block is
served by ``mmap`` (``hblkhd`` grows); once the setting is on, it comes from the heap and stays
there after ``free`` so the next step reuses it. Each case runs in a fresh interpreter so the
test process's allocator is left alone.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, sys
    from manyways.training import keep_cpu_allocations

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    applied = keep_cpu_allocations(sys.argv[1] == "on")
    size = 64 * 2**20
    before = libc.mallinfo2()
    block = libc.malloc(size)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    print(json.dumps({
        "applied": applied,
        "mmapped_growth": during.hblkhd - before.hblkhd,
        "mmapped_after_free": after.hblkhd - before.hblkhd,
        "heap_in_use_growth": during.uordblks - before.uordblks,
        "heap_trimmed_by_free": during.arena - after.arena,
    }))
    """
)


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    return hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to observe")
def test_large_blocks_come_from_the_heap_and_stay_there_once_enabled() -> None:
    on = _probe("on")
    assert on["applied"] is True
    assert on["mmapped_growth"] == 0
    assert on["heap_in_use_growth"] >= 64 * 2**20
    assert on["heap_trimmed_by_free"] == 0  # kept: the next step reuses it


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to observe")
def test_disabled_restores_glibc_mmap_path_for_large_blocks() -> None:
    off = _probe("off")
    assert off["applied"] is True
    assert off["mmapped_growth"] >= 64 * 2**20
    assert off["heap_in_use_growth"] < 64 * 2**20
    assert off["mmapped_after_free"] == 0  # unmapped on free: the next step faults it in again
