"""Linear layers with their bf16 weights packed once for oneDNN, for CPU inference (hf back-end).

torch's bf16 ``F.linear`` on CPU hands oneDNN the plain weight, which oneDNN reorders into its
blocked (AMX / VNNI) layout on every call. At decode's few rows that reorder costs as much as the
product: on the demo's generate batch, ``mm`` was 40% of decode time, about 3x the time to read
the weights (``benchmarks/profile_figure.py``-style profile, AMX machine, 2026-12-03). Reordering
once (``torch.ops.mkldnn._reorder_linear_weight``) and calling
``torch.ops.mkldnn._linear_pointwise`` gives the same output, bit for bit at every shape we tried
(1-2,000 rows, the 135M default's 576/1536/49152 widths; the back-end's samples are tested equal
with and without it). A stack of the default's linear shapes streaming from memory ran 1.19x,
1.04x, 1.70x and 1.68x faster at 4, 20, 40 and 80 rows (``benchmarks/bench_packed_linear.py``,
AMX machine, medians of 7 interleaved pairs).

:func:`install` wraps the ``forward`` of every bf16 ``nn.Linear`` on the CPU; the wrapper takes the
packed path only when nothing needs a gradient (the op has no backward) and the input is a bf16
CPU tensor, and otherwise calls the module's own ``forward``. The packed copy is made on first
use and made again if the weight was changed in place (its version counter) or replaced. Cost:
one packed copy of every linear weight (the model's linear weights again, in bf16), kept while
the model lives. ``BackendConfig.packed_linear: false`` turns it off.

GRPO's generation on CPU runs the trained model's fp32 weights under bf16 autocast
(:func:`manyways.training.cache_casts_during_generation`): autocast casts each weight to bf16 and
torch's linear reorders that copy on every decode step. :func:`packed_during` (``under_autocast``)
casts and packs each weight once per ``generate`` call instead, computing what autocast computes
(input, weight and bias in bf16), and drops the copies when the call returns.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

# rows oneDNN is told to expect: 16 and 64 ran alike at 4-80 rows, 1 slower (bench_packed_linear)
BATCH_HINT = 64
_ATTR = "_manyways_packed"


def available() -> bool:
    """Whether this torch build can pack bf16 linear weights for oneDNN on this CPU."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (bf16, ``[out, in]``) reordered once into oneDNN's layout (a new tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``packed = pack(weight)``; no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_weight(module: Any) -> torch.Tensor:
    """The module's weight in bf16, packed; made again when the weight changed or was replaced."""
    weight = module.weight
    key = (id(weight), weight._version, weight.data_ptr())
    cached = getattr(module, _ATTR, None)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight.to(torch.bfloat16)))
        setattr(module, _ATTR, cached)
    return cached[1]


def _bf16_autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16:
            return linear(x, _packed_weight(self), self.bias)
        if (
            weight.dtype == torch.float32
            and x.dtype in (torch.float32, torch.bfloat16)
            and _bf16_autocast_on()
        ):
            # what CPU bf16 autocast does to F.linear: input, weight and bias cast to bf16
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return linear(x.to(torch.bfloat16), _packed_weight(self), bias)
    return self._manyways_plain_forward(x)


def install(model: Any, under_autocast: bool = False) -> int:
    """Wrap the bf16 CPU ``nn.Linear`` layers of ``model`` (see the module docstring), and with
    ``under_autocast`` its fp32 ones too, which then take the packed path while CPU bf16 autocast
    is on (their weight cast to bf16 and packed once, as autocast would cast it on every call);
    returns how many are wrapped (0 when :func:`available` is False or no layer qualifies).
    Idempotent."""
    if not available():
        return 0
    dtypes = (torch.bfloat16, torch.float32) if under_autocast else (torch.bfloat16,)
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:  # not LoRA's or quantized subclasses
            continue
        weight = module.weight
        if weight.dtype not in dtypes or weight.device.type != "cpu" or weight.is_meta:
            continue
        if not hasattr(module, "_manyways_plain_forward"):
            module._manyways_plain_forward = module.forward
            module.forward = types.MethodType(_forward, module)
        count += 1
    if count:
        logger.debug("packed-weight bf16 linear layers: %d", count)
    return count


@contextmanager
def packed_during(model: Any, under_autocast: bool = True) -> Iterator[int]:
    """:func:`install` for the duration of the block, then :func:`uninstall` (the packed copies
    freed, so none outlives an optimizer step); yields how many layers were wrapped."""
    count = install(model, under_autocast=under_autocast)
    try:
        yield count
    finally:
        if count:
            uninstall(model)


def uninstall(model: Any) -> int:
    """Undo :func:`install`: the layers' own ``forward`` back, the packed copies freed."""
    count = 0
    for module in model.modules():
        plain = module.__dict__.pop("_manyways_plain_forward", None)
        if plain is None:
            continue
        if getattr(plain, "__func__", None) is type(module).forward:
            module.__dict__.pop("forward", None)  # the class's own
        else:
            module.forward = plain  # an instance-level forward (a hook's wrapper) that was there
        module.__dict__.pop(_ATTR, None)
        count += 1
    return count
