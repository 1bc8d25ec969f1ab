"""The report in a real headless Chromium: no JS/console errors, numbers in the DOM, not blank.

Dependency-free: Chromium's own ``--dump-dom`` (the DOM after scripts ran), ``--screenshot``
(decoded with matplotlib) and ``--enable-logging=stderr`` (console messages). Debian's chromium
is installed with apt-get when absent and we are root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from manyways.stages import report
from test_report import CellParser, make_run

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and we are not root to apt-get it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, env=env, timeout=900
    )
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def browse(chromium: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_renders_cleanly_in_chromium(chromium: str, tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path)
    page = report.render(run_dir)
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())["results"]

    dom = browse(chromium, page, tmp_path / "profile1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-js-errors="0"' in dom.stdout  # the hook ran and saw no error
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    parser = CellParser()
    parser.feed(dom.stdout)
    assert len(parser.cells) == 8
    for i, cell in enumerate(parser.cells):
        bench = ["zeta", "alpha"][i % 4 // 2]
        point = results[cell["row"]][bench]["pass_at_k"][str(cell["k"])]
        assert cell["value"] == point["value"]
        assert cell["text"].startswith(f"{point['value']:.3f}")
    assert "window.pwned" in dom.stdout and "<script>window.pwned" not in dom.stdout

    shot = tmp_path / "shot.png"
    done = browse(chromium, page, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1600")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    import matplotlib.image

    pixels = np.asarray(matplotlib.image.imread(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    gray = pixels[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # text, tables and figures, not a blank page
    assert (gray < 0.5).mean() > 0.005  # some dark ink (text) is drawn


def test_analysis_sections_render_in_chromium(chromium: str, tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path)
    page = report.render(run_dir)
    dom = browse(chromium, page, tmp_path / "profile3", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-js-errors="0"' in dom.stdout
    for needle in (
        'id="judge-validity"',
        'id="modes"',
        'id="modes-figure"',
        'id="composition-figure"',
        'id="vendi-figure"',
        'data-value="0.125"',
        'data-value="1.6875"',
        "low-recall",
    ):
        assert needle in dom.stdout, needle
    # one grouped figure per analysis and one pass@k figure per benchmark, all drawn inline
    assert dom.stdout.count("<svg") == 2 + 1 + 3
