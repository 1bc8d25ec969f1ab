"""Figure 9: ``make demo``'s experiment wall time and each stage's share, read from a demo run.

The demo is never run here (about 20 minutes). The value is the experiment command's wall time
(``runs/tiny_cpu/experiment.json``, field ``wall_s``, written by ``manyways experiment``): with
``experiment.jobs: 2`` two stages run at once, so it is less than the stages' summed time. The
stage manifests (``stages/*/manifest.json``, ``wall_s``) give each stage kind's share of the summed
stage time; stages shared between arms run once (content-addressed store). Model preparation, the
peek and ``make install`` are not counted; for the end-to-end time run ``time make demo``. A run
that reused stages from an earlier one (a resumed demo) is marked: its wall time is not the demo's.
An older run without ``wall_s`` in experiment.json falls back to the summed stage time.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from common import REPO_ROOT, Figure


def stage_walls(run_dir: Path) -> dict[str, float]:
    """Seconds per stage kind over all finished stage manifests under ``run_dir/stages``."""
    out: dict[str, float] = defaultdict(float)
    for manifest in sorted((run_dir / "stages").glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        kind = manifest.parent.name.rsplit("-", 1)[0]
        out[kind] += float(data.get("wall_s") or 0.0)
    return dict(out)


TARGET_MINUTES = 12  # issue 16: the demo at its current sizes in half its 2026-11 time


def figure_9(run_dir: Path | None = None) -> Figure:
    """The demo's stage time from ``run_dir`` (default: ``MANYWAYS_BENCH_DEMO_RUN`` or this
    checkout's ``runs/tiny_cpu``), e.g. a demo run in a clean clone."""
    run_dir = run_dir or Path(os.environ.get("MANYWAYS_BENCH_DEMO_RUN") or REPO_ROOT / "runs" / "tiny_cpu")
    walls = stage_walls(run_dir) if run_dir.exists() else {}
    if not walls:
        return Figure(
            9,
            "make demo wall time (minutes)",
            None,
            f"<= {TARGET_MINUTES} min",
            None,
            None,
            "-",
            {"note": "not measured in this run: no runs/tiny_cpu; run `time make demo`, then bench"},
        )
    total = sum(walls.values())
    experiment = _experiment_record(run_dir)
    wall = experiment.get("wall_s")
    measured = float(wall) if wall is not None else total
    minutes = measured / 60
    what = "experiment wall time" if wall is not None else "sum of stage wall_s (no experiment wall_s)"
    return Figure(
        9,
        f"make demo {what} (minutes)",
        minutes,
        f"<= {TARGET_MINUTES} min",
        minutes <= TARGET_MINUTES,
        None,
        "-",
        {
            "jobs": experiment.get("jobs", 1),
            "stage_minutes_summed": round(total / 60, 2),
            "parallel_speedup": round(total / measured, 2) if measured else None,
            "stages_reused": len(experiment.get("reused") or []),
            "share": {k: round(v / total, 3) for k, v in sorted(walls.items())},
            "seconds": {k: round(v, 1) for k, v in sorted(walls.items())},
            "complete": (run_dir / "report.html").exists() or any(run_dir.glob("**/report.html")),
            "run_dir": str(run_dir),
            "note": "experiment.json wall_s (stages at once with experiment.jobs); shares of the summed "
            "stage wall_s; excludes install, model prep and peek; stages_reused counts the steps that "
            "found their stage done (shared between arms in this run, e.g. the judge's validity, or "
            "finished by an earlier run when the demo was resumed)",
        },
    )


def _experiment_record(run_dir: Path) -> dict:
    path = run_dir / "experiment.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
