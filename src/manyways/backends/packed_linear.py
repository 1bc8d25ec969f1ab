"""Linear layers with their bf16 weights packed once for oneDNN, for CPU inference (hf back-end).

torch's bf16 ``F.linear`` on CPU hands oneDNN the plain weight, which oneDNN reorders into its
blocked (AMX / VNNI) layout on every call. At decode's few rows that reorder costs as much as the
product: on the demo's generate batch, ``mm`` was 40% of decode time, about 3x the time to read
the weights (``benchmarks/profile_figure.py``-style profile, AMX machine, 2026-12-03). Reordering
once (``torch.ops.mkldnn._reorder_linear_weight``) and calling
``torch.ops.mkldnn._linear_pointwise`` gives the same output, bit for bit at every shape we tried
(1-2,000 rows, the 135M default's 576/1536/49152 widths; the back-end's samples are tested equal
with and without it), in 0.4-0.75x the time at 1-80 rows.

:func:`install` wraps the ``forward`` of every bf16 ``nn.Linear`` on the CPU; the wrapper takes the
packed path only when nothing needs a gradient (the op has no backward) and the input is a bf16
CPU tensor, and otherwise calls the module's own ``forward``. The packed copy is made on first
use and made again if the weight was changed in place (its version counter) or replaced. Cost:
one packed copy of every linear weight (the model's linear weights again, in bf16), kept while
the model lives. ``BackendConfig.packed_linear: false`` turns it off.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

logger = logging.getLogger(__name__)

BATCH_HINT = 64  # rows oneDNN is told to expect; decode speed was the same for hints 1-1024
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
    weight = module.weight
    key = (id(weight), weight._version, weight.data_ptr())
    cached = getattr(module, _ATTR, None)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight))
        setattr(module, _ATTR, cached)
    return cached[1]


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return self._manyways_plain_forward(x)
    return linear(x, _packed_weight(self), self.bias)


def install(model: Any) -> int:
    """Wrap the bf16 CPU ``nn.Linear`` layers of ``model`` (see the module docstring); returns how
    many are wrapped (0 when :func:`available` is False or no layer qualifies). Idempotent."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:  # not LoRA's or quantized subclasses
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.is_meta:
            continue
        if not hasattr(module, "_manyways_plain_forward"):
            module._manyways_plain_forward = module.forward
            module.forward = types.MethodType(_forward, module)
        count += 1
    if count:
        logger.debug("packed-weight bf16 linear layers: %d", count)
    return count


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
