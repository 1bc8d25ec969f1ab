"""The report: table numbers equal results.json, text is escaped, the summary matches."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from manyways.artifacts import StageDir, write_json_atomic
from manyways.backends.fake import FakeBackend
from manyways.config import load_config
from manyways.report_html import ReportData, render_html, summary_text
from manyways.stages import evaluate, report

QUESTIONS = {f"What is {i} minus {i + 1}?": str(-1 - 0 * i) for i in range(5)}
EVIL = "<script>window.pwned=1</script> & </pre></details>"


class CellParser(HTMLParser):
    """Collects (row, k, data-value, visible text) of the results table's number cells."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.row: str | None = None
        self.in_table = False
        self.cell: dict | None = None
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        if tag == "table":
            self.in_table = a.get("id") == "results"
        if tag == "tr" and self.in_table:
            self.row = a.get("data-row")
        if tag == "td" and self.in_table and "data-value" in a:
            self.cell = {"row": self.row, "k": int(a["data-k"]), "value": float(a["data-value"]), "text": ""}
        self._in_script = tag == "script"

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "td" and self.cell is not None:
            self.cells.append(self.cell)
            self.cell = None
        if tag == "table":
            self.in_table = False
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self.cell is not None:
            self.cell["text"] += data
        if self._in_script:
            self.scripts.append(data)


def make_run(tmp_path: Path) -> tuple[Path, object]:
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS.items()))
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            "run.seed=5",
            f"data.eval={{zeta: {{kind: local, path: {data}}}, alpha: {{kind: local, path: {data}}}}}",
            "evaluate.samples=4",
            "evaluate.bootstrap=100",
            "evaluate.models={alt: other}",
        ],
    )
    rates = {"other": 0.9}
    evaluate.run(
        cfg,
        cfg.run_dir / "evaluate",
        show_progress=False,
        backend_factory=lambda _c, p: FakeBackend(
            answers=QUESTIONS, correct_rate=rates.get(p, 0.4), model_id=p
        ),
    )
    stage = StageDir(cfg.run_dir / "analyze", "analyze", {"fake": 1})
    stage.open()
    write_json_atomic(cfg.run_dir / "analyze" / "analysis.json", fake_analysis())
    stage.finish({})
    return cfg.run_dir, cfg


def fake_analysis() -> dict:
    return {
        "vendi": {
            "traces": 8,
            "kernels": {
                "ngram": {
                    "kernel": "ngram",
                    "overall": 3.25,
                    "per_problem_mean": 1.5,
                    "per_problem_ci": [1.25, 1.75],
                    "per_problem_max_traces": 2,
                    "kernel_label": "ngram(1,2 word-grams, cosine)/hashed to 4096",
                    "per_question_kernel_label": "ngram(1,2 word-grams, cosine)",
                    "problems_with_2plus": 4,
                    "per_heuristic": {"decompose": 2.0, "work_backward": 1.7},
                }
            },
        },
        "yield": {"per_heuristic": {"decompose": 0.75, "work_backward": 0.25}},
        "judge_validity": {
            "exemplars": 32,
            "parsed": 32,
            "recall": 0.125,
            "multi_label_share": 0.5,
            "low_recall": True,
        },
        "modes": {
            "method": "nearest centroid",
            "per_model": {
                "base": {
                    "samples": 8,
                    "unassigned": 1,
                    "questions": 4,
                    "effective_modes_mean": 1.6875,
                    "effective_modes_ci": [1.25, 2.0],
                    "per_mode": {"decompose": {"samples": 5, "share": 0.7142857, "correct_share": 0.6}},
                }
            },
            "judge_agreement": {"base": {"compared": 4, "agreement": 0.75}},
        },
        "composition": {
            "judge_model": "j",
            "mid_training": {
                "traces": 4,
                "parsed": 4,
                "parse_failures": 0,
                "parse_failure_rate": 0.0,
                "failure_reasons": {},
                "multi_heuristic_share": 0.25,
                "top_combinations": [],
            },
            "per_model": {
                "base": {
                    "traces": 4,
                    "parsed": 1,
                    "parse_failures": 3,
                    "parse_failure_rate": 0.75,
                    "failure_reasons": {"not_json": 3},
                    "multi_heuristic_share": 1.0,
                    "mean_heuristics": 2.0,
                    "top_combinations": [{"combination": "carry_out + decompose", "count": 1}],
                    "multi_heuristic_share_ci": [0.5, 1.0],
                    "new_combinations": [{"combination": "bolzano_bracketing + decompose", "count": 1}],
                    "failure_examples": ["I think <b>decompose</b>"],
                    "top_heuristics": [],
                }
            },
        },
        "trace_samples": [
            {
                "heuristic": "decompose",
                "problem_id": "p0",
                "question": "What is 1-2?",
                "trace": EVIL,
                "correct": True,
                "score": 0.1,
            }
        ],
        "mid_training_rows": 8,
    }


def test_report_stage_numbers_equal_results_json(tmp_path: Path) -> None:
    run_dir, cfg = make_run(tmp_path)
    manifest = report.run(
        cfg,
        run_dir / "report",
        inputs={"evaluate": run_dir / "evaluate", "analyze": run_dir / "analyze"},
        show_progress=False,
    )
    page = (run_dir / "report.html").read_text()
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())["results"]
    parser = CellParser()
    parser.feed(page)
    assert len(parser.cells) == 2 * 2 * 2  # rows x benchmarks x (pass@1, pass@4)
    for cell in parser.cells:
        bench = ["zeta", "alpha"][parser.cells.index(cell) % 4 // 2]  # config order, not sorted
        point = results[cell["row"]][bench]["pass_at_k"][str(cell["k"])]
        assert cell["value"] == point["value"]
        assert cell["text"].startswith(
            f"{point['value']:.3f} [{point['ci_low']:.3f}, {point['ci_high']:.3f}]"
        )
    assert {c["k"] for c in parser.cells} == {1, 4}
    assert [c["row"] for c in parser.cells[::4]] == ["base", "alt"]
    # the terminal summary carries the same numbers
    summary = manifest["summary"]
    assert summary == (run_dir / "report" / "summary.txt").read_text().strip()
    base_alpha = results["base"]["alpha"]["pass_at_k"]
    assert summary.index("zeta:") < summary.index("alpha:")
    assert f"{base_alpha['1']['value']:.3f} [{base_alpha['1']['ci_low']:.3f}," in summary
    assert "alt" in summary and "pass@4" in summary
    # the data it was rendered from is stored and round-trips
    stored = json.loads((run_dir / "report" / "report_data.json").read_text())
    assert render_html(ReportData.from_dict(stored)) == page


def test_text_from_data_is_escaped(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path)
    page = report.render(run_dir).read_text()
    assert EVIL not in page and "window.pwned" in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt; &amp; &lt;/pre&gt;&lt;/details&gt;" in page
    parser = CellParser()
    parser.feed(page)
    assert not any("pwned" in s for s in parser.scripts)
    assert page.count("<details>") == 2 and page.count("</details>") == 2  # a trace, unparsed judge answers
    assert "I think &lt;b&gt;decompose&lt;/b&gt;" in page


def test_sections_show_yield_vendi_composition_and_sizes(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path)
    page = report.render(run_dir).read_text()
    for needle in (
        'id="yield"',
        'id="vendi"',
        'id="composition"',
        'id="sizes"',
        "0.750",
        "3.25",
        "not_json: 3",
        "carry_out + decompose",
        "bootstrap intervals over problems",
    ):
        assert needle in page
    assert page.count("<svg") >= 2 + 1 + 3  # two pass@k figures, yield, Vendi, composition, modes
    for needle in (
        'id="judge-validity"',
        'id="modes"',
        'id="modes-figure"',
        "1.69",  # effective modes
        "bolzano_bracketing + decompose",  # a new combination
        "this run mid-training data",  # the composition reference row
        "hashed to 4096",  # kernels are named
        "[1.25, 1.75]",  # the per-question Vendi CI
        "only 12% of the catalogue",
        "composition numbers above noise",
    ):
        assert needle in page, needle
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)  # self-contained: nothing fetched


def test_arms_as_rows_for_the_experiment_runner(tmp_path: Path) -> None:
    point = {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}
    stats = {
        "pass_at_k": {"1": point, "8": {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0}},
        "mean_at_n": 0.5,
        "problems": 16,
        "samples": 128,
        "excluded": 0,
        "n": 8,
    }
    data = ReportData(
        title="exp <1>",
        row_kind="arm",
        results={"vanilla_rl": {"gsm8k": stats}, "polya_n4": {"gsm8k": stats}},
    )
    path = report.render(tmp_path, data)
    page = path.read_text()
    assert path == tmp_path / "report.html"
    assert "<title>exp &lt;1&gt;</title>" in page and ">arm</th>" in page
    assert "No yield data" in page and "No composition analysis" in page
    text = summary_text(data)
    assert "vanilla_rl" in text and "0.900 [0.800,1.000]" in text


def test_summary_columns_line_up_with_long_row_names() -> None:
    point = {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}
    stats = {"pass_at_k": {"1": point, "4": point}, "problems": 12, "excluded": 0, "n": 4}
    names = ["base", "incorrect_rl (mid)", "a_much_longer_arm_name (mid)"]
    data = ReportData(title="t", row_kind="arm", results={n: {"math": stats} for n in names})
    rows = [line for line in summary_text(data).splitlines() if line.endswith(" 0")]
    assert len(rows) == 3
    assert len({line.index("0.500") for line in rows}) == 1  # pass@1 starts in one column for all


def test_report_needs_evaluate(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.root={tmp_path}"])
    with pytest.raises(ValueError, match="evaluate"):
        report.run(cfg, tmp_path / "report", inputs={})


def test_pass_at_k_panels_pair_each_arm_with_its_mid_trained_model() -> None:
    from manyways.report_html import row_families

    rows = ["base", "polya_n4 (mid)", "polya_n4", "vanilla_rl", "star_rl (mid)", "star_rl"]
    assert row_families(rows) == {
        "polya_n4": ["base", "polya_n4 (mid)", "polya_n4"],
        "vanilla_rl": ["base", "vanilla_rl"],
        "star_rl": ["base", "star_rl (mid)", "star_rl"],
    }
    plain = [f"m{i}" for i in range(8)]
    assert list(row_families(plain).values()) == [plain[:6], plain[6:]]


def test_experiment_report_merges_validity_modes_and_references(tmp_path: Path) -> None:
    from manyways.experiment_report import _merge_analysis

    data = ReportData(title="t", results={})
    analysis = fake_analysis()
    analysis["modes"]["per_model"]["midtrain"] = analysis["modes"]["per_model"]["base"]
    _merge_analysis(data, analysis, "polya_n4")
    assert data.judge_validity == {"polya_n4": analysis["judge_validity"]}
    assert set(data.modes["per_model"]) == {"polya_n4", "polya_n4 (mid)"}
    assert data.composition["mid_training"] == {"polya_n4": analysis["composition"]["mid_training"]}
    assert "polya_n4 / ngram" in data.vendi["kernels"]
    page = render_html(data)
    assert "polya_n4 mid-training data" in page and page.count('id="modes-figure"') == 1
