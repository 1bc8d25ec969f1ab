"""Stage ``select``: build the mid-training dataset from verified, scored attempts.

Variants (``select.variant``):

- ``best`` (the method): per (problem, heuristic), the top-ranked attempt verified ``correct``.
- ``incorrect`` (ablation): per (problem, heuristic), the top-ranked attempt verified
  ``incorrect`` (an answer was read and it is wrong; ``no_answer``, ``timeout``, ``error`` and
  empty completions are never used). Rank them with ``score.include_incorrect=true``.
- ``star`` (STaR baseline): one correct attempt per problem from a plain-mode generate run
  (``generate.mode=plain``); ``heuristic_id`` is null.

Candidates: attempts with the wanted verdict, a non-empty completion and ``finish_reason ==
"stop"`` (a trace cut by the token limit is never a training target, even when an early boxed
answer made it verify; the others are counted as ``unfinished_<reason>``).

Reasoning teachers: with ``select.think=strip`` (the default) a completion holding a
``</think>`` is trained on the text after the last ``</think>`` only (the teacher's written
solution, not its hidden deliberation), and that text is verified again: it must itself carry
the wanted verdict. A ``<think>`` that never closes, an empty solution after it, or a solution
whose verdict differs is dropped and counted (``think_unclosed``, ``think_empty``,
``think_verdict_changed``). ``select.think=keep`` trains on the whole completion.

Ranking within a (problem, heuristic) pair, deterministic: score descending (unscored attempts
last), then lower ``sample_idx``. Ties (every score is 0 with ``score.scorer=none``, as for
STaR) go to the first sample drawn, a representative one: each sample has its own seed, so
sample 0 is a random draw, not the shortest trace.

Subsets: ``select.heuristics=n`` keeps only the first n heuristics generate used (its manifest's
``heuristic_ids``, catalogue order), so one 16-heuristic generation serves an n=4 arm.

Fixed budget ``budget_heuristics`` n x ``budget_problems`` m: exactly n x m rows, or an error
giving the numbers (a budget the data cannot supply is a config error, not a smaller
experiment). n > 1: the first n heuristics (catalogue order, as ``select.heuristics=n``) and m
problems drawn by a hashlib-seeded shuffle (``select.seed``) among the problems where every one
of the n heuristics has a selected trace. n = 1: m problems drawn the same way among those with
at least one selected trace; each contributes one trace, that of the first heuristic in
catalogue order that has one (so mostly the first heuristic; the manifest counts the rows that
fell back to a later one as ``budget_fallback_rows``).

Each row is a TRL conversational example: ``messages`` = system ``PLAIN_SYSTEM``, user = the plain
question (heuristic instruction and exemplars removed), assistant = the trace; plus provenance
(``schema.SFT_SCHEMA``). An empty selection is an error (nothing to train on).

Inputs: ``generate``, ``verify``, ``score``. Outputs under ``<run>/select/``: ``train.parquet``,
``train.jsonl``, ``manifest.json``.

CPU command: ``manyways select configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from manyways.artifacts import (
    StageDir,
    append_metrics,
    read_manifest,
    read_table,
    write_parquet_atomic,
    write_text_atomic,
)
from manyways.config import Config
from manyways.heuristics import PLAIN_SYSTEM, render_sft_messages
from manyways.schema import SFT_SCHEMA, Problem

log = logging.getLogger(__name__)

STAGE = "select"
Key = tuple[str, str | None, int]


class SelectionError(RuntimeError):
    """The selection is empty or the inputs cannot serve the asked variant."""


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config the selection depends on."""
    return {"select": cfg.select.model_dump(mode="json")}


def _key(row: dict[str, Any]) -> Key:
    return row["problem_id"], row["heuristic_id"], int(row["sample_idx"])


def seeded_order(ids: list[str], seed: int, salt: str) -> list[str]:
    """``ids`` shuffled by sha256(seed, salt, id): stable across processes and input order."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\x1f{salt}\x1f{i}".encode()).hexdigest())


def rank_key(cand: dict[str, Any]) -> tuple[float, int]:
    """Sort key, best first: score desc (None last), then lower sample_idx (never the length)."""
    score = cand["score"]
    return (-score if score is not None else math.inf, int(cand["sample_idx"]))


def training_text(completion: str, think: str) -> tuple[str | None, str | None]:
    """The text trained on and, when there is none, why (see ``select.think``)."""
    if think == "keep" or ("</think>" not in completion and "<think>" not in completion):
        return completion, None
    if "</think>" not in completion:
        return None, "think_unclosed"
    answer = completion.rsplit("</think>", 1)[1].strip()
    return (answer, None) if answer else (None, "think_empty")


def allowed_heuristics(cfg: Config, generated: list[str | None], mode: str) -> list[str | None]:
    """The heuristics the variant and the subset option allow, in generate's order."""
    if cfg.select.variant == "star":
        if mode != "plain":
            raise SelectionError(
                f"select.variant=star needs a plain-mode generate run (generate.mode=plain); "
                f"this one used mode={mode!r}"
            )
        return [None]
    n = cfg.select.heuristics
    if n is not None:
        if n > len(generated):
            raise SelectionError(
                f"select.heuristics={n} but generate used only {len(generated)}: {generated}"
            )
        return generated[:n]
    return list(generated)


def wanted_status(cfg: Config) -> str:
    return "incorrect" if cfg.select.variant == "incorrect" else "correct"


def load_candidates(
    inputs: dict[str, Path], cfg: Config, problems: dict[str, Problem]
) -> tuple[list[dict[str, Any]], Counter[str], set[Any]]:
    """Attempts joined with their verdict status and score that the variant may use, each with
    the ``target`` text trained on; counters; and the (problem, heuristic) pairs with at least
    one correct attempt."""
    verdicts = {_key(v): v["status"] for v in read_table(inputs["verify"]).to_pylist()}
    scores = {_key(s): float(s["score"]) for s in read_table(inputs["score"]).to_pylist()}
    wanted = wanted_status(cfg)
    counts: Counter[str] = Counter()
    correct_pairs: set[Any] = set()
    out = []
    for a in read_table(inputs["generate"]).to_pylist():
        counts["attempts"] += 1
        status = verdicts.get(_key(a))
        counts[f"status_{status}"] += 1
        if status == "correct":
            correct_pairs.add((a["problem_id"], a["heuristic_id"]))
        if status != wanted or not a["completion"].strip():
            continue
        if a["finish_reason"] != "stop":
            counts["unfinished"] += 1
            counts[f"unfinished_{a['finish_reason']}"] += 1
            continue
        target, dropped = training_text(a["completion"], cfg.select.think)
        if target is not None and target != a["completion"]:
            dropped = _reverify(problems[a["problem_id"]], target, wanted, cfg.verify.timeout_s)
        if dropped:
            counts[dropped] += 1
            continue
        a = {**a, "status": status, "score": scores.get(_key(a)), "target": target}
        counts["unscored_candidates"] += int(a["score"] is None)
        out.append(a)
    return out, counts, correct_pairs


def _reverify(problem: Problem, target: str, wanted: str, timeout_s: float) -> str | None:
    """None when the text after a think block alone still has the wanted verdict."""
    from manyways.verify.registry import verify_problem

    status = verify_problem(problem, target, timeout_s=timeout_s).status
    return None if status == wanted else "think_verdict_changed"


def best_per_pair(
    groups: dict[tuple[str, str | None], list[dict[str, Any]]],
) -> dict[tuple[str, str | None], dict[str, Any]]:
    """The selected trace of each (problem, heuristic) pair: its top-ranked candidate."""
    return {pair: min(cands, key=rank_key) for pair, cands in groups.items() if cands}


def choose(
    best: dict[tuple[str, str | None], dict[str, Any]],
    problem_order: list[str],
    heuristics: list[str | None],
) -> list[dict[str, Any]]:
    """The selected trace of each pair, in problem then heuristic order."""
    return [best[(p, h)] for p in problem_order for h in heuristics if (p, h) in best]


def choose_budget(
    best: dict[tuple[str, str | None], dict[str, Any]],
    problem_order: list[str],
    heuristics: list[str | None],
    n: int,
    m: int,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Exactly n x m selected traces (see the module docstring) and the budget's counters."""
    if n > len(heuristics):
        raise SelectionError(
            f"select.budget_heuristics={n} but only {len(heuristics)} heuristics are available"
        )
    used = heuristics[:n]
    covered = {p: [h for h in heuristics if (p, h) in best] for p in problem_order}
    if n == 1:
        eligible = [p for p in problem_order if covered[p]]
        rule = "at least one heuristic with a selected trace"
    else:
        eligible = [p for p in problem_order if all((p, h) in best for h in used)]
        rule = f"a selected trace under each of the first {n} heuristics {used}"
    if len(eligible) < m:
        raise SelectionError(
            f"fixed budget {n} x {m} = {n * m} traces cannot be met: it needs {m} problems with "
            f"{rule}, and only {len(eligible)} of {len(problem_order)} have that. Lower "
            "select.budget_problems, or generate more samples per pair."
        )
    drawn = set(seeded_order(eligible, seed, "problem")[:m])
    kept = [p for p in problem_order if p in drawn]
    if n == 1:
        chosen = [best[(p, covered[p][0])] for p in kept]
        fallback = sum(1 for p in kept if covered[p][0] != heuristics[0])
    else:
        chosen, fallback = [best[(p, h)] for p in kept for h in used], 0
    counts = {"budget_eligible_problems": len(eligible), "budget_fallback_rows": fallback}
    assert len(chosen) == n * m
    return chosen, counts


def sft_records(
    chosen: list[dict[str, Any]], questions: dict[str, str], variant: str
) -> list[dict[str, Any]]:
    return [
        {
            "messages": render_sft_messages(questions[c["problem_id"]], c["target"], system=PLAIN_SYSTEM),
            "problem_id": c["problem_id"],
            "heuristic_id": c["heuristic_id"],
            "sample_idx": int(c["sample_idx"]),
            "variant": variant,
            "correct": c["status"] == "correct",
            "score": c["score"],
        }
        for c in chosen
    ]


def selection_counts(chosen: list[dict[str, Any]], heuristics: list[str | None]) -> dict[str, int]:
    per_h = Counter(c["heuristic_id"] for c in chosen)
    return {
        "selected_rows": len(chosen),
        "problems_covered": len({c["problem_id"] for c in chosen}),
        **{f"selected:{h or 'plain'}": per_h.get(h, 0) for h in heuristics},
    }


def write_outputs(out_dir: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    write_parquet_atomic(out_dir / "train.parquet", pa.Table.from_pylist(records, schema=SFT_SCHEMA))
    write_text_atomic(
        out_dir / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )


def _choose(
    cfg: Config,
    best: dict[tuple[str, str | None], dict[str, Any]],
    order: list[str],
    heuristics: list[str | None],
) -> tuple[list[dict[str, Any]], dict[str, int], list[str | None]]:
    """The chosen traces, the budget's counters and the heuristics they use."""
    n, m = cfg.select.budget_heuristics, cfg.select.budget_problems
    if n is None or m is None:
        return choose(best, order, heuristics), {}, heuristics
    chosen, counts = choose_budget(best, order, heuristics, n, m, cfg.select.seed)
    present = {c["heuristic_id"] for c in chosen}
    return chosen, counts, [h for h in heuristics if h in present]


def select_records(
    cfg: Config, inputs: dict[str, Path]
) -> tuple[list[dict[str, Any]], dict[str, int], list[str | None]]:
    """The SFT records, the counters and the heuristics used (see the module docstring)."""
    from manyways.data import read_problems

    gen_manifest = read_manifest(inputs["generate"])
    mode = gen_manifest["config"]["generate"]["mode"]
    heuristics = allowed_heuristics(cfg, list(gen_manifest["heuristic_ids"]), mode)
    problems = read_problems(inputs["generate"] / "problems.parquet")
    order = [p.problem_id for p in problems]
    candidates, counts, correct_pairs = load_candidates(inputs, cfg, {p.problem_id: p for p in problems})
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for c in candidates:
        if c["heuristic_id"] in heuristics:
            groups.setdefault((c["problem_id"], c["heuristic_id"]), []).append(c)
    counts["candidates"] = len(candidates)
    counts["pairs_total"] = len(order) * len(heuristics)
    counts["pairs_with_correct"] = sum(1 for p in order for h in heuristics if (p, h) in correct_pairs)
    counts["pairs_with_candidate"] = sum(1 for p in order for h in heuristics if groups.get((p, h)))
    best = best_per_pair(groups)
    if not best:
        raise SelectionError(
            f"select.variant={cfg.select.variant} selected nothing: no usable {wanted_status(cfg)} attempt "
            f"among {counts['attempts']} attempts ({dict(sorted(counts.items()))}); nothing to train on. "
            "Generate more samples, use an easier problem set, or check the verify stage's yield."
        )
    chosen, budget_counts, heuristics = _choose(cfg, best, order, heuristics)
    counts.update(budget_counts)
    counts.update(selection_counts(chosen, heuristics))
    return (
        sft_records(chosen, {p.problem_id: p.question for p in problems}, cfg.select.variant),
        dict(counts),
        heuristics,
    )


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done)."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items()}
    missing = [k for k in ("generate", "verify", "score") if k not in inputs]
    if missing:
        raise ValueError(f"stage {STAGE} needs the output of {', '.join(missing)} (inputs)")
    stage = StageDir(
        out_dir, STAGE, stage_config(cfg), inputs={k: inputs[k] for k in ("generate", "verify", "score")}
    )
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    records, counts, heuristics = select_records(cfg, inputs)
    write_outputs(out_dir, records)
    per_h = {str(h or "plain"): counts.get(f"selected:{h or 'plain'}", 0) for h in heuristics}
    manifest = stage.finish(
        counts,
        {
            "variant": cfg.select.variant,
            "heuristic_ids": heuristics,
            "per_heuristic": per_h,
            "rows": len(records),
        },
    )
    append_metrics(out_dir.parent, STAGE, {**counts, "wall_s": manifest["wall_s"]})
    log.info(
        "%s (%s): %d rows over %d problems, per heuristic %s -> %s",
        STAGE,
        cfg.select.variant,
        len(records),
        counts["problems_covered"],
        per_h,
        out_dir,
    )
    return manifest
