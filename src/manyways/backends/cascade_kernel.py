"""The fused CPU kernel for one cascade decode step (``cascade_decode.c``), built on first use.

:func:`cascade_decode` computes what :func:`manyways.backends.cascade._decode_step` computes (one
query token per row against its prompt's shared prefix and its own suffix, one softmax) in one C
call instead of ~25 torch ops, reading the cache's buffers in place. It is plain C with no torch
headers: the first use compiles it (``cc -O3 -march=native``, about a second) into
``~/.cache/manyways/kernels`` (``MANYWAYS_CACHE`` moves it), keyed by the source, the flags and the
machine, and loads it with ``ctypes``. Where no C compiler is found or the build fails, it logs
why once and the torch path runs. ``MANYWAYS_CASCADE_KERNEL=0`` turns it off.

Numerics: scores, softmax and the weighted sums in float32, from bfloat16 or float32 inputs, the
output rounded once to the inputs' dtype; the torch path rounds the scores and the probabilities
to bfloat16 before its matmuls, so in bfloat16 the kernel is the more exact of the two and they
agree to bf16 rounding (tested against the torch path and a float64 reference in
``tests/test_cascade_kernel.py``). Single-threaded: the back-end decodes with one torch thread on
CPU (``BackendConfig.threads``); with more, the torch path is taken (its GEMMs use the threads).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cascade_decode.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p

_state: dict[str, object] = {}  # "lib": the loaded library, or None once a build failed


def enabled() -> bool:
    """Whether the kernel may be used (``MANYWAYS_CASCADE_KERNEL`` not 0/false/off)."""
    return os.environ.get("MANYWAYS_CASCADE_KERNEL", "1").strip().lower() not in ("0", "false", "off", "no")


def kernel_dir() -> Path:
    """Where built kernels are kept: ``kernels/`` under the manyways cache root."""
    from manyways.models import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str | None = None, target_dir: Path | None = None) -> Path:
    """Compile the kernel (when not built already) and return the shared library's path; raises
    ``RuntimeError`` with the compiler's message when it cannot."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join((compiler, *FLAGS, platform.machine(), platform.node())).encode()
    ).hexdigest()[:16]
    target_dir = target_dir or kernel_dir()
    target = target_dir / f"cascade_decode-{key}.so"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.manyways_cascade_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_int, _I64, _I64, _I64, _I64,  # dtype, rows, kv_heads, group, dim
        _PTR, _PTR,  # q, prompt_of_row
        _PTR, _I64, _I64, _I64,  # prefix K^T and strides
        _PTR, _I64, _I64, _I64,  # prefix V and strides
        _I64, _PTR,  # P, prefix mask
        _PTR, _I64, _I64, _I64,  # suffix K^T and strides
        _PTR, _I64, _I64, _I64,  # suffix V and strides
        _I64, _PTR, _I64,  # S, suffix mask, its row stride
        ctypes.c_float, _PTR, _PTR,  # scale, out, work
        _PTR, _PTR,  # the end of the prefix K^T's and the suffix K^T's storage
    ]  # fmt: skip
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None when disabled or it cannot be built
    (logged once)."""
    if not enabled():
        return None
    if "lib" not in _state:
        try:
            _state["lib"] = _load(build())
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            logger.warning("cascade decode kernel unavailable, using torch ops instead: %s", exc)
            _state["lib"] = None
    return _state["lib"]  # type: ignore[return-value]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: CPU, one dtype it knows, unit last stride, and
    torch running on one thread."""
    dtype = tensors[0].dtype
    return (
        dtype in DTYPES
        and torch.get_num_threads() == 1
        and all(t.device.type == "cpu" and t.dtype == dtype and t.stride(-1) == 1 for t in tensors)
    )


def _storage_end(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    return storage.data_ptr() + storage.nbytes()


def cascade_decode(
    lib: ctypes.CDLL,
    query: torch.Tensor,
    prompt_of_row: torch.Tensor,
    prefix_kt: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_mask: torch.Tensor | None,
    suffix_kt: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` (``[rows, kv_heads, group, dim]``) over each row's prompt prefix
    (``prefix_kt`` ``[prompts, kv_heads, dim, P]``, ``prefix_v`` ``[prompts, kv_heads, P, dim]``,
    ``prefix_mask`` ``[prompts, P]`` bool or None) and its own suffix (``suffix_kt`` ``[rows,
    kv_heads, dim, S]``, ``suffix_v`` ``[rows, kv_heads, S, dim]``, ``suffix_mask`` ``[rows, S]``
    bool or None, broadcast over rows when its first size is 1); returns ``[rows, kv_heads, group,
    dim]`` in the query's dtype. Every tensor must pass :func:`usable`, and every entry of
    ``prompt_of_row`` (int64) must be a prompt of the prefix (:class:`~manyways.backends.cascade.RowGroups`
    checks this when it is built; the kernel reads without bounds checks)."""
    rows, kv_heads, group, dim = query.shape
    P, S = prefix_kt.shape[-1], suffix_kt.shape[-1]
    if prompt_of_row.dtype != torch.int64 or prompt_of_row.numel() != rows:
        raise ValueError("prompt_of_row must be int64 with one entry per row")
    if prefix_kt.shape[:2] != prefix_v.shape[:2] or suffix_kt.shape[0] != rows:
        raise ValueError("prefix keys and values, or suffix and query rows, disagree in shape")
    q = query.contiguous()
    rows_map = prompt_of_row.contiguous()
    out = torch.empty_like(q)
    work = torch.empty(group * (P + S) + 2 * group * dim + group, dtype=torch.float32)
    # torch stores bool as one byte 0/1: the kernel reads the masks in place
    pmask = None if prefix_mask is None else prefix_mask.to(torch.bool).contiguous()
    smask = None if suffix_mask is None else suffix_mask.to(torch.bool)
    if smask is not None and smask.stride(-1) != 1:
        smask = smask.contiguous()
    mask_row_stride = 0 if smask is None or smask.shape[0] == 1 else smask.stride(0)
    status = lib.manyways_cascade_decode(
        DTYPES[q.dtype], rows, kv_heads, group, dim,
        q.data_ptr(), rows_map.data_ptr(),
        prefix_kt.data_ptr(), *prefix_kt.stride()[:3],
        prefix_v.data_ptr(), *prefix_v.stride()[:3],
        P, None if pmask is None else pmask.data_ptr(),
        suffix_kt.data_ptr(), *suffix_kt.stride()[:3],
        suffix_v.data_ptr(), *suffix_v.stride()[:3],
        S, None if smask is None else smask.data_ptr(), mask_row_stride,
        float(scale), out.data_ptr(), work.data_ptr(), _storage_end(prefix_kt), _storage_end(suffix_kt),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cascade decode kernel failed (status {status})")
    return out
