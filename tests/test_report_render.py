import copy
import os
import shutil

import numpy as np
import pytest

from edgekd.report_render import pareto_front, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["size.png", "latency.png", "accuracy_latency.png", "latency_distribution.png"]


def _lat(rng, p50, p90, p99, mean, std, n=200):
    s = rng.lognormal(np.log(p50), 0.08, n)
    return {"p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std, "samples": s.tolist()}


def make_summary():
    rng = np.random.default_rng(0)
    return {
        "schema": "edgekd.report/1",
        "title": "edgekd report: finsent",
        "created": "2026-11-27T20:00:00Z",
        "machine": {"cpu": "Intel Xeon Platinum 8375C", "cores": 2, "threads": 2,
                    "os": "Linux-6.1-x86_64", "runtime": "executorch 1.5.1 (XNNPACK)"},
        "dataset": {"name": "finsent", "labels": ["negative", "neutral", "positive"],
                    "test_size": 280, "max_length": 64},
        "variants": [
            {"name": "teacher-fp32", "role": "teacher", "title": "Teacher (fine-tuned)",
             "artifact": "export/teacher-fp32/model.pte", "size_bytes": 90953868,
             "params": 22714755, "quant": "fp32", "accuracy": 0.861, "macro_f1": 0.85,
             "input_tokens": 20, "dynamic_length": True,
             "latency_ms": _lat(rng, 23.5, 25.9, 32.9, 24.2, 1.18)},
            {"name": "student-fp32", "role": "student", "title": "Student (distilled)",
             "artifact": "export/student-fp32/model.pte", "size_bytes": 16788012,
             "params": 4197123, "quant": "fp32", "accuracy": 0.857, "macro_f1": 0.842,
             "input_tokens": 21, "dynamic_length": True,
             "latency_ms": _lat(rng, 6.2, 6.82, 8.1, 6.31, 0.41)},
            {"name": "student-int8", "role": "compressed", "title": "Student, int8",
             "artifact": "export/student-int8/model.pte", "size_bytes": 4078612,
             "params": 4197123, "quant": "int8", "accuracy": 0.854, "macro_f1": 0.839,
             "input_tokens": 64, "dynamic_length": False,
             "latency_ms": _lat(rng, 3.85, 4.24, 5.02, 3.9, 0.27)},
        ],
        "ratios": [
            {"variant": "student-fp32", "size_x": 5.4, "latency_p50_x": 3.8,
             "accuracy_delta_points": -0.4, "params_x": 5.4},
            {"variant": "student-int8", "size_x": 22.3, "latency_p50_x": 6.1,
             "accuracy_delta_points": -0.7, "params_x": 5.4},
        ],
        "baseline": {"name": "TF-IDF + logistic regression", "accuracy": 0.78, "macro_f1": 0.77},
        "stages": [{"stage": "finetune", "wall_s": 120.4}, {"stage": "distill", "wall_s": 310.0},
                   {"stage": "export", "wall_s": 42.7}],
        "notes": ["Latency measured with 1 thread after 20 warm-up runs.", "a < b & c"],
    }


def test_all_files_and_numbers(tmp_path):
    paths = render_report(make_summary(), tmp_path)
    assert {p.name for p in paths} == {"report.md", "report.html", *PLOTS}
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for name in PLOTS:
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)
    # no temp files left behind by the atomic writes
    assert not [f for f in os.listdir(tmp_path) + os.listdir(tmp_path / "plots") if f.endswith(".tmp")]

    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "# edgekd report: finsent" in md
    assert "| Metric | Teacher (fine-tuned) | Student (distilled) | Student, int8 |" in md
    assert "| Model size | 90.95 MB (90,953,868 B) | 16.79 MB (16,788,012 B) | 4.08 MB (4,078,612 B) |" in md
    assert "| Latency p50 / p90 (ms) | 23.5 / 25.9 | 6.20 / 6.82 | 3.85 / 4.24 |" in md
    assert "| Input (tokens) | 20, dynamic length | 21, dynamic length | 64, padded |" in md
    assert "| Accuracy / macro-F1 (test) | 86.1 % / 0.850 | 85.7 % / 0.842 | 85.4 % / 0.839 |" in md
    assert "| Parameters | 22.71 M | 4.20 M | 4.20 M |" in md
    assert ("student-int8: 22.3x smaller, 6.1x faster at p50, accuracy -0.7 points, "
            "5.4x fewer parameters") in md
    assert "TF-IDF + logistic regression on the same split: accuracy 78.0 %, macro-F1 0.770" in md
    assert "| teacher-fp32 | 23.5 | 25.9 | 32.9 | 24.2 | 1.18 | 200 |" in md
    assert "| finetune | 120.4 |" in md and "| Total | 473.1 |" in md
    assert "- Latency measured with 1 thread after 20 warm-up runs." in md
    assert "Intel Xeon Platinum 8375C, 2 cores / 2 threads" in md
    for name in PLOTS:
        assert f"](plots/{name})" in md


def test_html_self_contained_and_escaped(tmp_path):
    s = make_summary()
    s["variants"][1]["title"] = "Student <b>bold</b>"
    s["variants"][1]["name"] = "student-<b>"
    render_report(s, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == len(PLOTS)
    assert "plots/" not in page  # nothing external
    assert "<b>" not in page
    assert "Student &lt;b&gt;bold&lt;/b&gt;" in page and "student-&lt;b&gt;" in page
    assert "a &lt; b &amp; c" in page
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "<b>" not in md


def test_missing_values_render_dash_and_plots_still_work(tmp_path):
    s = make_summary()
    s["variants"][2]["accuracy"] = None
    s["variants"][2]["size_bytes"] = None
    s["variants"][1]["latency_ms"]["samples"] = []
    s["ratios"][1]["size_x"] = None
    s["baseline"] = None
    paths = render_report(s, tmp_path)
    assert {p.name for p in paths} == {"report.md", "report.html", *PLOTS}
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| 86.1 % / 0.850 | 85.7 % / 0.842 | — / 0.839 |" in md
    assert "| 16.79 MB (16,788,012 B) | — |" in md
    assert "| student-fp32 | 6.20 | 6.82 |" in md and "| — |" in md
    assert "student-int8: —x smaller" not in md and "student-int8: — smaller" in md
    # A ratio that was not measured (Core ML latency and accuracy off Apple hardware) is left out of the line.
    s["ratios"][1].update(latency_p50_x=None, accuracy_delta_points=None, accuracy_delta_ci95_points=None)
    render_report(s, tmp_path)
    line = next(x for x in (tmp_path / "report.md").read_text(encoding="utf-8").splitlines()
                if x.startswith("- student-int8:"))
    assert line == "- student-int8: — smaller, 5.4x fewer parameters"
    assert "on the same split" not in md
    for name in PLOTS:
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)


def test_plots_skipped_without_data(tmp_path):
    s = make_summary()
    for v in s["variants"]:
        v["latency_ms"] = None
    paths = render_report(s, tmp_path)
    names = {p.name for p in paths}
    assert names == {"report.md", "report.html", "size.png"}
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "plots/latency.png" not in md and "plots/size.png" in md
    assert "| Latency p50 / p90 (ms) | — | — | — |" in md


def test_empty_summary_renders(tmp_path):
    paths = render_report({"schema": "edgekd.report/1", "title": "empty"}, tmp_path)
    assert {p.name for p in paths} == {"report.md", "report.html"}


def test_rejects_unknown_schema(tmp_path):
    with pytest.raises(ValueError):
        render_report({"schema": "edgekd.report/2"}, tmp_path)


def test_wide_latency_range_duplicate_names_and_zero_values(tmp_path):
    # log axes, rotated tick labels, duplicate names and zero values must not crash
    s = make_summary()
    rng = np.random.default_rng(1)
    for name, p50 in [("student-int8-pruned-with-a-long-name", 0.45), ("student-int8", 0.6)]:
        v = copy.deepcopy(s["variants"][2])
        v.update(name=name, latency_ms=_lat(rng, p50, p50 * 1.2, p50 * 1.5, p50, 0.02), size_bytes=0)
        s["variants"].append(v)
    paths = render_report(s, tmp_path)
    assert len([p for p in paths if p.suffix == ".png"]) == 4
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| 0.00 MB (0 B) |" in md and "| student-int8 | 0.600 | 0.720 |" in md


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    render_report(make_summary(), tmp_path)
    before = (tmp_path / "report.md").read_bytes()
    s = make_summary()
    s["title"] = "changed"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        render_report(s, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_bytes() == before
    leftovers = os.listdir(tmp_path) + os.listdir(tmp_path / "plots")
    assert not [f for f in leftovers if f.endswith(".tmp")]


def test_pareto_front():
    # (latency, accuracy): index 2 is dominated by 1 (faster and more accurate)
    pts = [(23.5, 86.1), (6.2, 85.7), (8.0, 85.0), (3.9, 85.4), (None, 99.0)]
    assert pareto_front(pts) == [3, 1, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties both kept
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]


def test_render_for_visual_check(tmp_path):
    # Leaves one rendering in /tmp for a human look at the PNGs.
    out = os.environ.get("EDGEKD_REPORT_DEBUG_DIR")
    if not out:
        pytest.skip("set EDGEKD_REPORT_DEBUG_DIR to keep a rendering")
    shutil.rmtree(out, ignore_errors=True)
    render_report(copy.deepcopy(make_summary()), __import__("pathlib").Path(out))


def test_intervals_and_failed_variants_are_rendered(tmp_path):
    s = make_summary()
    s["variants"][2]["accuracy_ci95"] = [0.8075, 0.8906]
    s["ratios"][1]["accuracy_delta_ci95_points"] = [-2.9, 1.4]
    s["intervals"] = "Accuracy intervals: Wilson 95 % score intervals over the test texts."
    s["failed"] = [{"name": "student-int4", "reason": "finsent-student_xnnpack_int4.pte fails parity <planted>"}]
    render_report(s, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "| Accuracy, 95 % interval (test) | — | — | 80.8 to 89.1 % |" in md
    assert "accuracy -0.7 points (paired 95 % interval -2.9 to +1.4)" in md
    assert "## Failed variants" in md
    assert "- student-int4: finsent-student_xnnpack_int4.pte fails parity &lt;planted&gt;" in md
    assert "<h2>Failed variants</h2>" in page and "fails parity &lt;planted&gt;" in page
    assert "Wilson 95 % score intervals" in md


def test_exports_side_by_side_count_once_and_one_after_the_other_add_up():
    from edgekd.report import _busy_seconds

    def manifest(end: str, wall: float) -> dict:
        return {"created": f"2026-12-01T{end}+00:00", "wall_s": wall}

    # Two exports of 400 s and 350 s that ran at the same time: 400 s, not 750.
    assert _busy_seconds([manifest("23:14:00", 400), manifest("23:13:10", 350)]) == 400
    # One after the other, or one reused from an earlier day: they add up, the gap between them does not count.
    assert _busy_seconds([manifest("23:00:00", 300), manifest("23:05:00", 300)]) == 600
    assert _busy_seconds([manifest("10:00:00", 100), manifest("23:00:00", 200)]) == 300


def test_the_generation_report_lists_the_budget_search_and_a_budget_of_0_is_one(tmp_path):
    import yaml

    from edgekd.manifest import claim_run_dir, write_stage
    from edgekd.tasks.generation_report import _search, search_lines

    claim_run_dir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"task": "text-generation", "compress": {"budget": 0}}))
    with write_stage(tmp_path / "compress", "compress", {}, {}) as stage:
        stage.metrics = {"chosen": "fp32", "baseline": {"from": "student", "perplexity": 2.0}, "budget": 0,
                         "metric": "perplexity",
                         "candidates": [{"quant": "int4", "perplexity": 2.2, "cost": 10.0, "within": False},
                                        {"quant": "fp32", "perplexity": 2.0, "cost": 0.0, "within": True}]}
    lines = search_lines(_search(tmp_path))
    assert lines == ["Budget search: validation perplexity within 0% of the student's (2), specs in the order listed:",
                     "int4: 2.2 (+10.0%), over budget", "fp32: 2 (+0.0%), chosen"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"task": "text-generation"}))  # a later run without one
    assert _search(tmp_path) is None
