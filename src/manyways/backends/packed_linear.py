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
torch's linear reorders that copy on every decode step. With ``under_autocast`` the wrapper casts
and packs each fp32 weight once instead, computing what autocast computes (input, weight and bias
in bf16).

GRPO's training forward then needs the same bf16 weights again: the optimizer has not run since
generation, so autocast would cast every weight once more. With ``for_training`` the copies are
kept until the weight changes, and a forward that needs gradients takes them through
:class:`CachedCastLinear`: the packed product forward, and in the
backward the products autograd runs for an autocast linear (``grad @ W`` and ``grad.T @ x`` in
bf16, the weight's gradient cast to fp32), bit for bit the same outputs and gradients (tested).
It takes that path only when the copies already exist for the current weights (else the layer's
own forward runs: autocast casts, as before), so SFT and any forward after an optimizer step and
before the next generation are unchanged. "Unchanged" is checked twice: the weight's version
counter (any in-place op through autograd) and :func:`drop_copies_on_optimizer_step`, because
torch's fused AdamW updates the weights without bumping their version counters; the caller also
drops the copies before each generation (:func:`drop_copies`), so they are made from the
weights of that moment. On figure 8's GRPO step (135M default, AMX machine) the
training forward went from 0.315 to 0.245 s. Cost: the packed and the plain bf16 copy of every
linear weight live from one generation to the next weight change (4 bytes a parameter; autocast
held the plain one through each training step anyway).
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

logger = logging.getLogger(__name__)

# rows oneDNN is told to expect: 16 and 64 ran alike at 4-80 rows, 1 slower (bench_packed_linear)
BATCH_HINT = 64
_ATTR = "_manyways_packed"
_TRAIN_ATTR = "_manyways_packed_for_training"  # keep the plain bf16 cast; serve autograd forwards


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


def _key(weight: torch.Tensor) -> tuple[int, int, int]:
    return (id(weight), weight._version, weight.data_ptr())


def _packed_weight(module: Any) -> torch.Tensor:
    """The module's weight in bf16, packed; made again when the weight changed or was replaced.
    The plain bf16 cast is kept beside it where the module keeps copies for training."""
    weight = module.weight
    key = _key(weight)
    cached = getattr(module, _ATTR, None)
    if cached is None or cached[0] != key:
        plain = weight.detach().to(torch.bfloat16)
        cached = (key, pack(plain), plain if getattr(module, _TRAIN_ATTR, False) else None)
        setattr(module, _ATTR, cached)
    return cached[1]


def drop_copies(model: Any) -> int:
    """Free every copy kept for ``model``'s layers (they are made again on next use); returns how
    many layers had one."""
    dropped = 0
    for module in model.modules():
        dropped += module.__dict__.pop(_ATTR, None) is not None
    return dropped


_DROP_ON_STEP: Any = None  # the models whose copies every optimizer step drops (a WeakSet)


def drop_copies_on_optimizer_step(model: Any) -> None:
    """Drop ``model``'s copies after every optimizer step in this process, for as long as the
    model lives (one global ``torch.optim`` step post-hook serves all such models)."""
    global _DROP_ON_STEP
    import weakref

    from torch.optim.optimizer import register_optimizer_step_post_hook

    if _DROP_ON_STEP is None:
        _DROP_ON_STEP = weakref.WeakSet()
        models = _DROP_ON_STEP

        def hook(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            for target in list(models):
                drop_copies(target)

        register_optimizer_step_post_hook(hook)
    _DROP_ON_STEP.add(model)


def cached_copies(module: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(plain bf16 weight, packed weight) kept for ``module``'s current weight, or None when there
    are none or the weight changed since they were made."""
    cached = getattr(module, _ATTR, None)
    if cached is None or cached[2] is None or cached[0] != _key(module.weight):
        return None
    return cached[2], cached[1]


class CachedCastLinear(torch.autograd.Function):
    """``F.linear`` under CPU bf16 autocast of an fp32 ``weight``, from its kept bf16 copies.

    Forward: the packed product (bitwise torch's bf16 linear). Backward: what autograd runs for
    autocast's ``matmul(x, W.T)`` (``mm`` of the rows folded to 2-D): ``grad @ W`` for the input,
    ``grad.T @ x`` for the weight, ``grad`` summed over rows for the bias, in bf16, the weight's and
    bias's gradients then cast to fp32 as autocast's cast backward does. ``x`` must be bf16 and
    contiguous (the caller casts it, as autocast would, through autograd).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        plain: torch.Tensor,
        packed: torch.Tensor,
    ) -> torch.Tensor:
        bias16 = None if bias is None else bias.detach().to(torch.bfloat16)
        ctx.save_for_backward(x, plain)
        ctx.has_bias, ctx.weight_dtype = bias is not None, weight.dtype
        return linear(x, packed, bias16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, plain = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)
        grad_x = rows.mm(plain).view(*grad.shape[:-1], plain.shape[1]) if need_x else None
        grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])).to(ctx.weight_dtype) if need_w else None
        grad_b = rows.sum(0).to(ctx.weight_dtype) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None, None


def _bf16_autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return self._manyways_plain_forward(x)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        usable = weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
        copies = cached_copies(self) if usable and x.is_contiguous() and _bf16_autocast_on() else None
        if copies is not None:  # x cast as autocast casts it (through autograd)
            return CachedCastLinear.apply(x.to(torch.bfloat16), weight, self.bias, *copies)
    else:
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


def install(model: Any, under_autocast: bool = False, for_training: bool = False) -> int:
    """Wrap the bf16 CPU ``nn.Linear`` layers of ``model`` (see the module docstring), and with
    ``under_autocast`` its fp32 ones too, which then take the packed path while CPU bf16 autocast
    is on (their weight cast to bf16 and packed once, as autocast would cast it on every call);
    with ``for_training`` (implies ``under_autocast``) the fp32 layers also keep the plain bf16
    cast and serve forwards that need gradients from both copies while the weight is unchanged;
    returns how many are wrapped (0 when :func:`available` is False or no layer qualifies).
    Idempotent."""
    under_autocast = under_autocast or for_training
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
        if for_training and weight.dtype == torch.float32:
            setattr(module, _TRAIN_ATTR, True)
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
        module.__dict__.pop(_TRAIN_ATTR, None)
        count += 1
    return count
