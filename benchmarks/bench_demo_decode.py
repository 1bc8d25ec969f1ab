"""Figure 3b: the share of the decode bound the hf back-end reaches at the demo's batch shapes.

The generate stage's workload as ``configs/tiny_cpu.yaml`` configures it (its back-end, batch
size 80; heuristics.n 4 with 1 exemplar; 4 samples; 160 new tokens; temperature 0.7), the requests
captured from the stage's own ``GenerateWorker`` (``workloads.demo_generate_requests``) for its
first shard, of which the figure decodes the first ``fig3b_batches`` batches the back-end plans
(``plan_batches``, as the back-end's ``generate`` does): one batch is one heuristic's 20 prompts
x 4 samples = 80 rows, as in ``make demo``.
Only decode is timed (around ``HFBackend._decode``, as figure 3); every decode-step forward's rows
are recorded (each row's context, its prompt), and the figure is
``sum over steps of the step's bound time / measured decode time`` (``bounds.bound_share``): the
bound of each step (``bounds.decode_step_bound_rows_s``) for the model's weight bytes and the KV
read at that step's rows and contexts, shared-prefix (each prompt's KV read once per step, as the
back-end's cascade decode does) when the back-end uses it. Finished rows leave the batch, so the
steps run from 80 rows down. No baseline: repeated runs, median and spread.
"""

from __future__ import annotations

from typing import Any

from bench_generation import backend_run, decode_bound_shares
from common import Figure, median_spread, meets
from workloads import demo_generate_requests

from manyways.backends.hf import HFBackend
from manyways.backends.protocol import GenRequest


def first_batches(backend: HFBackend, requests: list[GenRequest], count: int) -> list[GenRequest]:
    """The requests of the first ``count`` batches the back-end plans for ``requests``
    (``HFBackend.plan``; a request split over batches is taken whole)."""
    chosen = {unit.request_index for batch in backend.plan(requests)[:count] for unit in batch}
    return [requests[i] for i in sorted(chosen)]


def figure_3b(backend: HFBackend, runs: int, sizes: dict[str, Any], bounds: dict) -> Figure:
    """Decode-step bound share at the demo's generate batch (median of ``runs`` runs)."""
    requests, cfg = demo_generate_requests(sizes.get("fig3b_config", "configs/tiny_cpu.yaml"), 1)
    requests = first_batches(backend, requests, sizes["fig3b_batches"])
    results = [backend_run(backend, requests) for _ in range(max(1, runs))]
    detail = decode_bound_shares(backend, results, bounds)
    value, spread = median_spread(detail["decode_fraction_of_bound_per_repeat"])
    g = cfg.generate
    first = results[0]["steps"][0] if results[0]["steps"] else None
    detail.update(
        {
            "workload": f"generate stage of {sizes.get('fig3b_config', 'configs/tiny_cpu.yaml')}, "
            f"the first {sizes['fig3b_batches']} planned batch(es) of its first shard ({g.shard_size} "
            f"problems): {len(requests)} prompts x "
            f"{g.samples} samples, max_new_tokens={g.max_new_tokens}, temperature={g.temperature}, "
            f"batch_size={backend.batch_size}, heuristics.n={cfg.heuristics.n}, "
            f"exemplars={cfg.heuristics.exemplars}",
            "batch_size": backend.batch_size,
            "first_step_rows": len(first.contexts) if first else 0,
            "first_step_prompts": len(set(first.prompt_of_row)) if first else 0,
            "first_step_context_mean": sum(first.contexts) / len(first.contexts) if first else 0,
            "decode_s": [r["decode_s"] for r in results],
            "decode_tokens": [r["decode_tokens"] for r in results],
            "dtype": str(next(backend.model.parameters()).dtype),
            "kv_dtype": str(backend.kv_dtype),
        }
    )
    return Figure(
        "3b",
        "decode-step time bound / measured, hf back-end at the demo's generate batch",
        value,
        ">= 50%",
        meets(value, 0.5, higher_is_better=True),
        spread,
        "-",
        detail,
    )
