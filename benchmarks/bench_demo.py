"""Figure 9: ``make demo`` wall time and each stage's share, read from an existing demo run.

The demo is never run here (about 20 minutes); its stage manifests (``runs/tiny_cpu/stages/*/
manifest.json``, field ``wall_s``) are summed per stage kind. Stages shared between arms run once
(content-addressed store), so the sum is the demo's compute time, not counting model preparation,
the peek and process start-up. For the end-to-end time run ``time make demo``.
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
    minutes = total / 60
    return Figure(
        9,
        "make demo stage time (minutes, sum of stage wall_s)",
        minutes,
        f"<= {TARGET_MINUTES} min",
        minutes <= TARGET_MINUTES,
        None,
        "-",
        {
            "share": {k: round(v / total, 3) for k, v in sorted(walls.items())},
            "seconds": {k: round(v, 1) for k, v in sorted(walls.items())},
            "complete": (run_dir / "report.html").exists() or any(run_dir.glob("**/report.html")),
            "run_dir": str(run_dir),
            "note": "sum of stage manifests' wall_s; excludes model prep, peek and start-up",
        },
    )
