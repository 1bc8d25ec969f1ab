"""The benchmark runner (``make bench``): every figure of BENCHMARKS.md in one run.

Each figure is a ratio (variants timed interleaved, ABAB, ``--repeats`` times, median and spread
reported) or a fraction of a bound measured in the same run (matmul rate, read bandwidth; see
``bounds.py``). Prints the table, writes ``bench_out/results.json`` and rewrites the generated
section of BENCHMARKS.md (between the ``BEGIN GENERATED`` / ``END GENERATED`` markers).
A run of a subset (``--only``) keeps the other figures of the previous ``results.json`` and says in
the table which run measured each carried-over figure. ``benchmarks/results_by_kind.json`` (in
the repository, so a later session on another kind of machine still has them) keeps the latest
results per kind of CPU (AMX, AVX512-BF16 without AMX, neither: bf16's speed differs between
them), and BENCHMARKS.md shows the other kinds' latest figures below this machine's.

Usage: ``.venv/bin/python benchmarks/run.py [--repeats 3] [--only 1,1b,2,4] [--no-markdown]``.
Figures are numbered 1-9; a figure that belongs next to another has a letter (``1b``: figure 1's
workload against the best plain usage; ``3b``: decode's share of the bound at the demo's batch).
Torch runs on 1 intra-op thread in this process (``OMP_NUM_THREADS=1``; the project's CPU default,
and the fairest setting on a shared 2-core machine); the verifier's pool has 1 worker.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# this checkout's package, not whichever one the venv's editable install points at
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))

from common import REPO_ROOT, Figure, cpu_kind, load_average, machine_facts, set_threads  # noqa: E402

log = logging.getLogger("bench")

SIZES: dict[str, Any] = {
    "fig1_problems": 2, "fig1_heuristics": 2, "fig1_samples": 4, "fig1_new_tokens": 48,
    "fig2_problems": 16, "fig2_heuristics": 4, "fig2_samples": 8,
    "fig3_short": 128, "fig3_long": 1100, "fig3_batch": 8, "fig3_new_tokens": 32,
    "fig3b_batches": 1, "fig3b_runs": 1, "fig3b_config": "configs/tiny_cpu.yaml",
    "fig4_pairs": 5000, "fig4_timeout_s": 1.0, "fig4_plain_limit_s": 15,
    "fig6_problems": 8, "fig6_heuristics": 2, "fig6_new_tokens": 96, "fig6_k": 4,
    "fig6_round": 2, "fig6_max": 8,
    "fig7_steps": 3, "fig7_batch": 4,  # the demo's midtrain.batch_size (2 before 2026-12-03)
    "fig8_steps": 10, "fig8_completion": 48,  # 5 before 2026-12-04: steps 2-5 are oneDNN's warm-up
}  # fmt: skip
FigureId = int | str
ALL_FIGURES: set[FigureId] = {*range(1, 10), "1b", "3b"}
GENERATION_FIGURES: set[FigureId] = {1, "1b", 2, 3, "3b", 5}
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
BY_KIND = REPO_ROOT / "benchmarks" / "results_by_kind.json"  # tracked: the latest run per kind of CPU


def figure_key(number: FigureId) -> tuple[int, str]:
    """Sort key of a figure id: 1 < "1b" < 2 < ... < 9 < 10."""
    text = str(number)
    digits = text[: len(text) - len(text.lstrip("0123456789"))]
    return (int(digits) if digits else 10**6, text[len(digits) :])


def parse_only(text: str) -> set[FigureId]:
    """``--only``'s comma-separated figure ids ("1,1b,3"), checked against ``ALL_FIGURES``."""
    ids: set[FigureId] = {
        int(x) if x.isdigit() else x.lower() for x in (t.strip() for t in text.split(",")) if x
    }
    unknown = ids - ALL_FIGURES
    if unknown:
        known = ",".join(map(str, sorted(ALL_FIGURES, key=figure_key)))
        raise SystemExit(f"unknown figure(s) {sorted(map(str, unknown))}: choose from {known}")
    return ids


def generation_figures(repeats: int, bounds: dict[str, float], only: set[FigureId]) -> list[Figure]:
    """Figures 1, 1b, 2, 3, 3b and 5 share one loaded back-end (as the demo's generate stage
    configures it) and one plain fp32 model; 1b adds the best plain usage's model."""
    from bench_best_plain import load_best_plain
    from bench_generation import figure_3, figures_1_2_5, load_pair

    from manyways.backends.config import BackendConfig
    from manyways.config import load_config

    backend_cfg: BackendConfig = load_config("configs/tiny_cpu.yaml").generate.backend
    backend, plain, tokenizer = load_pair(backend_cfg)
    out: list[Figure] = []
    if only & {1, "1b", 2, 5}:
        best = load_best_plain() if "1b" in only else None
        figs = figures_1_2_5(backend, plain, tokenizer, repeats, SIZES, bounds, best, only)
        out += [f for f in figs if f.number in only]
    if 3 in only:
        out.append(figure_3(backend, plain, tokenizer, repeats, SIZES, bounds))
    if "3b" in only:
        from bench_demo_decode import figure_3b

        out.append(figure_3b(backend, SIZES["fig3b_runs"], SIZES, bounds))
    return out


def model_params() -> int:
    from manyways.models import DEFAULT_MODEL, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    return sum(p.numel() for p in model.parameters())


def dtype_auto_decisions() -> dict[str, dict[str, Any]]:
    """What ``dtype: auto`` decides on this machine for the default model, per workload, with the
    rates it measured (cached per machine: measured on the first run only)."""
    from manyways.dtype_auto import resolve_auto_dtype
    from manyways.models import DEFAULT_MODEL

    return {w: resolve_auto_dtype(w, DEFAULT_MODEL)[1] for w in ("generation", "training")}


def dtype_auto_line(doc: dict[str, Any]) -> str:
    """One sentence: auto's choice per workload and the bf16/fp32 rate ratio it was based on."""
    parts = [
        f"{w} {r['dtype']} (bf16/fp32 rate {r['bf16_over_fp32_median_ratio']:.2f}, measured {r['measured_at']})"
        for w, r in (doc.get("dtype_auto") or {}).items()
        if "bf16_over_fp32_median_ratio" in r
    ]
    return f"`dtype: auto` on this machine (default model): {'; '.join(parts)}." if parts else ""


def run_all(repeats: int, only: set[FigureId]) -> dict[str, Any]:
    """Measure the bounds, then every selected figure; returns the results document."""
    from bounds import measure_bounds

    started = time.perf_counter()
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_facts(),
        "threads": 1,
        "repeats": repeats,
        "load_average_start": load_average(),
        "sizes": SIZES,
        "only": sorted(only, key=figure_key),
    }
    set_threads(1)
    bounds = measure_bounds()
    doc["bounds"] = bounds
    steps: list[tuple[set[FigureId], Callable[[], list[Figure]]]] = [
        (GENERATION_FIGURES, lambda: generation_figures(repeats, bounds, only)),
        ({4}, lambda: [__import__("bench_verify").figure_4(repeats, SIZES)]),
        ({6}, lambda: [__import__("bench_adaptive").figure_6(SIZES)]),
        ({7}, lambda: [__import__("bench_train").figure_7(repeats, SIZES, bounds, model_params())]),
        ({8}, lambda: [__import__("bench_train").figure_8(SIZES)]),
        ({9}, lambda: [__import__("bench_demo").figure_9()]),
    ]
    figures: list[Figure] = []
    for numbers, step in steps:
        if numbers & only:
            t0 = time.perf_counter()
            figures += step()
            log.info("figures %s: %.0fs", sorted(numbers & only, key=figure_key), time.perf_counter() - t0)
    figures.sort(key=lambda f: figure_key(f.number))
    doc["figures"] = [{**f.to_dict(), "run": doc["date"]} for f in figures]
    doc["dtype_auto"] = dtype_auto_decisions()
    doc["load_average_end"] = load_average()
    doc["wall_s"] = time.perf_counter() - started
    if only >= ALL_FIGURES:
        doc["last_full_run"] = {"date": doc["date"], "wall_s": doc["wall_s"]}
    return doc


def merge_previous(doc: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Add the figures of ``previous`` that ``doc`` did not measure (not run, or no value, as figure 9
    without a demo run), each marked with its run's date (and machine, when it differs), so a
    partial run never drops figures from the table."""
    if not previous:
        return doc
    previous_numbers = {f["number"] for f in previous.get("figures", []) if f.get("value") is not None}
    kept = [f for f in doc["figures"] if f.get("value") is not None or f["number"] not in previous_numbers]
    measured = {f["number"] for f in kept}
    same_machine = previous.get("machine", {}).get("cpu_model") == doc["machine"].get("cpu_model")
    carried = []
    for f in previous.get("figures", []):
        if f["number"] in measured:
            continue
        run = f.get("run") or previous.get("date", "?")
        if not same_machine and " on " not in run:
            run = f"{run} on {previous.get('machine', {}).get('cpu_model', '?')}"
        carried.append({**f, "run": run})
    figures = sorted(kept + carried, key=lambda f: figure_key(f["number"]))
    full = (
        doc.get("last_full_run")
        or previous.get("last_full_run")
        or {"date": previous.get("date"), "wall_s": previous.get("wall_s")}
    )
    return {**doc, "figures": figures, "last_full_run": full}


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


def table(doc: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| # | figure | value | target | met | spread | baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in doc["figures"]:
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        name = f["name"]
        if f.get("run") not in (None, doc["date"]):
            name += f" (earlier run: {f['run']})"
        lines.append(
            f"| {f['number']} | {name} | {fmt(f['value'])} | {f['target']} | {met} "
            f"| {fmt(f['spread'])} | {f['baseline']} |"
        )
    return "\n".join(lines)


def generated_section(doc: dict[str, Any]) -> str:
    m, b = doc["machine"], doc["bounds"]
    only = doc.get("only") or sorted(ALL_FIGURES, key=figure_key)
    if set(only) >= ALL_FIGURES:
        run = f"Run: {doc['date']}, `make bench` wall time {doc['wall_s'] / 60:.1f} min"
    else:
        run = f"Run: {doc['date']}, figures {','.join(map(str, only))} only ({doc['wall_s'] / 60:.1f} min)"
        full = doc.get("last_full_run") or {}
        if full.get("date") and full.get("wall_s") is not None:
            run += f"; last full `make bench`: {full['date']}, {full['wall_s'] / 60:.1f} min"
    return "\n".join(
        [
            BEGIN,
            f"{run}, {doc['repeats']} ABAB repeats, 1 torch thread.",
            f"Machine ({cpu_kind(m['cpu_flags'])}): {m['cpu_model']}, {m['cores']} cores, "
            f"flags {', '.join(m['cpu_flags'])}; "
            f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
            f"Python {m['python']}.",
            f"Load average (1/5/15 min): start {doc['load_average_start']}, end {doc['load_average_end']}.",
            f"Bounds (1 thread): fp32 matmul {b['peak_fp32_flops'] / 1e9:.0f} GFLOP/s, bf16 matmul "
            f"{b['peak_bf16_flops'] / 1e9:.0f} GFLOP/s, read bandwidth "
            f"{b['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s.",
            *([line] if (line := dtype_auto_line(doc)) else []),
            "",
            table(doc),
            "",
            *other_kinds_section(doc),
            "Details of every figure (baseline rates, fractions of bounds, workloads) are in "
            "`bench_out/results.json`.",
            END,
        ]
    )


def other_kinds_section(doc: dict[str, Any]) -> list[str]:
    """The latest figures measured on the other kinds of CPU (``doc["other_kinds"]``), labelled."""
    lines = []
    for kind, other in sorted((doc.get("other_kinds") or {}).items()):
        m = other["machine"]
        lines += [
            f"Latest figures on another kind of CPU ({kind}: {m['cpu_model']}, run {other['date']}):",
            "",
            table(other),
            "",
        ]
    return lines


def previous_results(results: Path, by_kind: Path, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The results a partial run keeps the other figures from: this checkout's last
    ``bench_out/results.json``, else (a fresh clone: ``bench_out/`` is not committed) the latest
    committed results of this run's kind of CPU, so ``--only 9`` never drops the rest."""
    if results.exists():
        return json.loads(results.read_text())
    if by_kind.exists():
        return json.loads(by_kind.read_text()).get(cpu_kind(doc["machine"]["cpu_flags"]))
    return None


def keep_by_kind(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Store ``doc`` as the latest results of its kind of CPU in ``path``; return ``doc`` with the
    other kinds' latest results attached (``other_kinds``) for BENCHMARKS.md."""
    by_kind = json.loads(path.read_text()) if path.exists() else {}
    kind = cpu_kind(doc["machine"]["cpu_flags"])
    by_kind[kind] = {k: v for k, v in doc.items() if k != "other_kinds"}
    path.write_text(json.dumps(by_kind, indent=2, default=str))
    return {**doc, "other_kinds": {k: v for k, v in by_kind.items() if k != kind}}


def update_markdown(path: Path, doc: dict[str, Any]) -> None:
    """Replace the generated section of ``path`` (appended when the markers are missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = generated_section(doc)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        default=",".join(map(str, sorted(ALL_FIGURES, key=figure_key))),
        help="comma-separated figure ids (1,1b,3b,...); the others are kept from the previous results.json",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "trl", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.chdir(REPO_ROOT)
    doc = run_all(args.repeats, parse_only(args.only))
    doc = merge_previous(doc, previous_results(args.out / "results.json", BY_KIND, doc))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    sys.stdout.write(table(doc) + "\n")
    doc = keep_by_kind(BY_KIND, doc)
    if not args.no_markdown:
        update_markdown(REPO_ROOT / "BENCHMARKS.md", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
