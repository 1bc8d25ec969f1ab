"""Figure 1b: the hf back-end over the best plain usage a knowledgeable user would write.

The best plain usage (issue 16 item 2): the model loaded in the dtype the project's ``dtype: auto``
picks for generation on this machine (:func:`manyways.dtype_auto.resolve_auto_dtype`: the faster of
bf16 and fp32 at the model's shapes, measured once per machine; its record says which and why),
every prompt of the workload in one left-padded batch (``tokenizer.padding_side = "left"``), one
``model.generate`` with ``num_return_sequences``; the sampling settings, new-token budget and
useful-token count (to the first EOS) of figure 1. Timed in figure 1's interleaved repeats
(``bench_generation.figures_1_2_5``); reported, no target.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import PLAIN_SAMPLING, Figure, median_spread, ratio_samples, useful_tokens

from manyways.dtype_auto import resolve_auto_dtype
from manyways.models import DEFAULT_MODEL, load_model_and_tokenizer


def load_best_plain(model_id: str = DEFAULT_MODEL, decide: Any = resolve_auto_dtype) -> tuple[Any, Any, dict]:
    """The best plain usage's model and tokenizer: the model in the dtype the project's
    ``dtype: auto`` picks for generation on this machine (``decide("generation", model_id)``: the
    faster of bf16 and fp32, measured; the decision record is returned), the tokenizer padding on
    the left (a pad token set to EOS if it has none)."""
    dtype, record = decide("generation", model_id)
    model, tokenizer = load_model_and_tokenizer(model_id, dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep = (
        "workload",
        "dtype",
        "reason",
        "bf16_over_fp32_median_ratio",
        "rates_flops",
        "measured_at",
        "cached",
    )
    return model.eval(), tokenizer, {k: record[k] for k in keep if k in record}


def best_plain_generate(
    model: Any, tokenizer: Any, messages: list[list[dict[str, str]]], samples: int, max_new_tokens: int
) -> dict[str, Any]:
    """The best plain usage: every prompt in one left-padded batch, one ``model.generate`` with
    ``num_return_sequences``; useful tokens counted as in ``bench_generation.plain_generate``."""
    start = time.perf_counter()  # tokenizing included, as in the other variants
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            **PLAIN_SAMPLING,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    counts = useful_tokens(new, {int(tokenizer.eos_token_id)})
    return {
        "wall_s": wall,
        "tokens": sum(counts),
        "texts": [
            tokenizer.decode(r[:c], skip_special_tokens=True) for r, c in zip(new, counts, strict=True)
        ],
        "rows": int(out.shape[0]),
    }


def figure_1b(
    backend: Any, rate: dict[str, list[float]], runs: dict, decision: dict, workload: str, samples: int
) -> Figure:
    """Ours / the best plain usage (figure 1's workload, timed in the same interleaved repeats)."""
    ratio, spread = median_spread(ratio_samples(rate["ours"], rate["best_plain"]))
    dtype = decision.get("dtype", "?")
    return Figure(
        "1b",
        "generation tokens/s, hf back-end / best plain generate (auto dtype, one left-padded batch)",
        ratio,
        "reported (no target)",
        None,
        spread,
        f"plain transformers generate, {dtype}, all prompts in one left-padded batch, "
        f"num_return_sequences={samples}",
        {
            "ours_tokens_per_s": median_spread(rate["ours"])[0],
            "best_plain_tokens_per_s": median_spread(rate["best_plain"])[0],
            "ours_dtype": str(next(backend.model.parameters()).dtype),
            "best_plain_dtype": dtype,
            "best_plain_dtype_decision": decision,  # dtype auto's record: why this dtype
            "best_plain_rows": runs["best_plain"][0]["rows"],
            "workload": workload,
            "best_plain_tokens": [r["tokens"] for r in runs["best_plain"]],
        },
    )
