"""`edgekd bench` on the host: real artifacts, baselines in PyTorch and ONNX Runtime, the versioned result,
and `edgekd report` of a bench directory. Timings are never asserted, only that they were measured."""
from __future__ import annotations

import json

import pytest

from edgekd.benchmarks.host import Variant, measure_interleaved
from edgekd.cli import main
from edgekd.manifest import verify_stage

pytest.importorskip("executorch")


def test_bench_with_baselines_writes_a_versioned_interleaved_result(bench_exports, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    arts = [bench_exports["et-fp32"], bench_exports["et-int8"], bench_exports["litert-fp32"]]
    out = tmp_path / "bench"
    code = main(["bench", *map(str, arts), "--out", str(out), "--iterations", "6", "--warmup", "1",
                 "--threads", "1", "--baselines", "torch,onnxruntime", "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["schema"] == "edgekd.bench/2" and result["complete"] is True
    rows = {r["name"]: r for r in result["results"]}
    artifacts = [r for r in result["results"] if r["kind"] == "artifact"]
    baselines = [r for r in result["results"] if r["kind"] == "baseline"]
    assert [r["name"] for r in artifacts] == [a.name for a in arts]
    assert {r["runtime"] for r in artifacts} == {"executorch", "litert"}
    # One torch fp32 baseline serves all three (one source model); ONNX Runtime: fp32 for the float
    # artifacts, int8 for the int8 one.
    assert sorted((r["runtime"], r["quant"]) for r in baselines) == [
        ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32")]
    assert rows["tiny-student-int8-onnxruntime"]["of"] == [arts[1].name]
    assert sorted(rows["tiny-student-fp32-torch"]["of"]) == sorted(a.name for a in arts)
    for row in result["results"]:
        lat = row["latency_ms"]
        assert lat["n"] == 6 and len(lat["samples"]) == 6 and lat["p50"] <= lat["p90"] <= lat["p99"]
        assert row["cpu_ms_per_inference"] > 0 and row["load_ms"] > 0 and row["peak_rss_mb"] > 0
        assert row["threads"] == 1 and row["versions"]
    assert rows["tiny-student-int8-onnxruntime"]["size_bytes"] < rows["tiny-student-fp32-onnxruntime"]["size_bytes"]
    speedups = {(r["variant"], r["reference"]) for r in result["ratios"]}
    assert (arts[1].name, arts[0].name) == next(iter(speedups & {(arts[1].name, arts[0].name)}))
    assert (arts[1].name, "tiny-student-int8-onnxruntime") in speedups
    assert (arts[0].name, "tiny-student-fp32-torch") in speedups
    manifest = verify_stage(out, "bench")
    assert manifest["machine"]["cpu"] and manifest["params"]["baselines"] == ["torch", "onnxruntime"]

    # The report of a bench directory goes beside it and compares the runtimes.
    assert main(["report", str(out), "--price-per-core-hour", "0.10"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Runtimes compared" in report and "tiny-student-int8-onnxruntime" in report
    assert "Cost per million inferences (USD at 0.1/core-hour)" in report
    summary = json.loads((tmp_path / "report.json").read_text())
    for v in summary["variants"]:
        assert v["cost_per_million_usd"] == pytest.approx(v["cpu_ms_per_inference"] * 0.10 / 3.6, abs=1e-4)
    # Each artifact was timed on its sample input: the .pte files (dynamic length, the default) at the text's own
    # tokens, the .tflite padded to max_length; the report says which
    exported = {a.name: verify_stage(a, "export") for a in arts}
    for v in summary["variants"]:
        manifest = exported[v["name"]]
        assert v["input_tokens"] == len(manifest["sample_input"]["input_ids"])
        assert v["dynamic_length"] is manifest["dynamic_length"] is (manifest["artifact"].endswith(".pte"))
    litert = exported[arts[2].name]
    pte_tokens = sum(exported[arts[0].name]["sample_input"]["attention_mask"])
    assert len(litert["sample_input"]["input_ids"]) == litert["max_length"] > pte_tokens
    row = next(line for line in report.splitlines() if line.startswith("| Input (tokens) |"))
    assert "dynamic length" in row and f"{litert['max_length']}, padded" in row
    for plot in ("size.png", "latency.png", "latency_distribution.png", "runtimes.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 1000


def test_time_budget_replaces_the_iteration_count(bench_exports, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(bench_exports["et-int8"]), "--out", str(out), "--seconds", "0.3", "--warmup", "0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["latency_ms"]["n"] >= 1
    assert verify_stage(out, "bench")["params"]["iterations"] is None


def test_a_runner_that_fails_mid_run_leaves_the_others_measured():
    def broken(ids, mask):
        raise RuntimeError("Execution of method forward failed with status 0x12\nmore")

    good = Variant({"name": "a"}, lambda ids, mask: None, (1, 2))
    bad = Variant({"name": "b"}, broken, (1, 2))
    assert measure_interleaved([good, bad], iterations=4) == 4
    assert len(good.samples) == 4 and bad.samples == []
    assert bad.row["error"] == "RuntimeError: Execution of method forward failed with status 0x12"


def test_unknown_baseline_lists_the_known_ones(bench_exports, tmp_path, capsys):
    assert main(["bench", str(bench_exports["et-fp32"]), "--out", str(tmp_path / "b"), "--baselines", "onnxrt"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown baseline runtime 'onnxrt' (did you mean 'onnxruntime'?); known: onnxruntime, torch"
    assert not (tmp_path / "b").exists()


def test_a_fresh_process_reads_its_own_peak_not_its_parents(tmp_path):
    """A bench starts one process per variant to read its peak RSS; the parent's high-water mark (here 600 MB
    more than the child will ever hold) must not leak into the child's figure, as ru_maxrss does on Linux."""
    import subprocess
    import sys

    from edgekd.benchmarks.host import peak_rss_mb

    ballast = b"\x01" * (600 * 2**20)  # touched pages: resident
    parent = peak_rss_mb()
    child = float(subprocess.run([sys.executable, "-c", "from edgekd.benchmarks.host import peak_rss_mb; "
                                  "print(peak_rss_mb())"], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) and parent > 600 and child < parent - 500, (parent, child)
