"""Parsers of the device tools' output, on verbatim or source-rendered samples (tests/fixtures/bench/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekd.benchmarks.android import parse_benchmark_model, parse_executor_runner, parse_minibench
from edgekd.benchmarks.ios import parse_xcodebuild
from edgekd.benchmarks.stats import aggregate_stats, latency_stats, pooled_stats

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_executor_runner_logcat_gives_per_iteration_times_load_and_threads():
    parsed = parse_executor_runner(read("executor_runner_logcat.txt"))
    assert parsed["error"] is None and parsed["executions"] == 5
    assert parsed["samples"] == [2.914062, 1.871094, 1.853515, 1.902344, 1.860352]
    assert parsed["total_ms"] == pytest.approx(sum(parsed["samples"]), abs=1e-5)
    assert parsed["load_ms"] == 18.20431 and parsed["threads"] == 4


def test_executor_runner_without_per_iteration_lines_gives_the_total():
    parsed = parse_executor_runner(read("executor_runner_posix_total_only.txt"))
    assert parsed["error"] is None and parsed["samples"] == [] and parsed["load_ms"] is None
    assert (parsed["executions"], parsed["total_ms"], parsed["threads"]) == (10, 44.87, 2)


def test_executor_runner_that_never_finished_is_an_error():
    parsed = parse_executor_runner(read("executor_runner_stuck_issue3919.txt"))
    assert parsed["executions"] is None
    assert parsed["error"] == "no 'Model executed successfully' line in its log"
    crashed = parse_executor_runner("E 00:00:00.316485 executorch:executor_runner.cpp:466] Execution of method forward "
                                    "failed with status 0x12\nAborted")
    assert crashed["error"] == "Execution of method forward failed with status 0x12"


def test_benchmark_model_timings_memory_and_threads():
    parsed = parse_benchmark_model(read("benchmark_model_xnnpack_issue999.txt"))
    lat = parsed["latency_ms"]
    assert parsed["error"] is None
    # The last count= line is the timed run (50 runs); the first one is the warm-up.
    assert (lat["n"], lat["mean"], lat["std"], lat["min"], lat["max"]) == (50, 55.0432, 1.562, 53.077, 60.727)
    assert lat["p50"] is None and lat["samples"] == []      # benchmark_model keeps no per-run times
    assert (parsed["load_ms"], parsed["first_ms"], parsed["threads"]) == (18.777, 64.791, 4)
    assert parsed["memory_mb"] == {"measure": "Memory footprint delta from the start of the tool",
                                   "init": 8.97656, "overall": 18.7227}
    # No "Replacing ... (TfLiteXNNPackDelegate)" line: on Android that means nothing was delegated.
    assert parsed["delegation"]["cpu_fallback"] is True and parsed["delegation"]["delegate"] is None


def test_benchmark_model_in_logcat_without_xnnpack_is_a_cpu_fallback():
    parsed = parse_benchmark_model(read("benchmark_model_android_logcat_issue56301.txt"))
    assert parsed["latency_ms"]["n"] == 75 and parsed["latency_ms"]["mean"] == pytest.approx(12.1676)
    assert parsed["load_ms"] == 126.059 and parsed["delegation"]["cpu_fallback"] is True


def test_benchmark_model_failure_is_named():
    parsed = parse_benchmark_model(read("benchmark_model_failed_issue56166.txt"))
    assert parsed["latency_ms"] is None and parsed["error"] == "Failed to apply XNNPACK delegate."


@pytest.mark.parametrize("line, replaced, total, partitions, fallback", [(0, 269, None, 13, False),
                                                                         (1, 131, 137, 4, True)])
def test_delegation_line_full_and_partial(line, replaced, total, partitions, fallback):
    text = read("benchmark_model_xnnpack_issue999.txt") + read("tflite_delegate_lines.txt").splitlines()[line]
    delegation = parse_benchmark_model(text)["delegation"]
    assert delegation == {"delegate": "TfLiteXNNPackDelegate", "replaced_nodes": replaced, "total_nodes": total,
                          "partitions": partitions, "cpu_fallback": fallback}


def test_minibench_results_json():
    parsed = parse_minibench(read("minibench_benchmark_results.json"), iterations=50)
    assert parsed["error"] is None
    assert parsed["latency_ms"]["mean"] == 2.4172 and parsed["latency_ms"]["trimmean_10_90"] == 2.3519
    assert parsed["latency_ms"]["n"] == 50 and parsed["latency_ms"]["p50"] is None
    assert (parsed["load_ms"], parsed["pss_mb"]) == (21.8842, 14.6552734375)
    assert parsed["device"] == {"device": "google", "arch": "Pixel 7", "os": "Android 14"}


def test_minibench_load_failure_and_garbage():
    rows = json.loads(read("minibench_benchmark_results.json"))
    failed = [r for r in rows if r["metric"] in ("model_load_time(ms)", "load_status")]
    failed[1]["actualValue"] = 18.0  # ModelRunner.kt writes only these two metrics when loadMethod fails
    assert parse_minibench(json.dumps(failed), 50)["error"] == "the app could not load the model (load_status 18)"
    assert "not the app's metric list" in parse_minibench("<html>", 50)["error"]


def test_xcodebuild_measured_lines():
    tests = parse_xcodebuild(read("xcodebuild_specificationkit.txt"))
    clock = tests["testAnySpecificationPerformance"]["Clock Monotonic Time, s"]
    assert clock == {"average": 0.004, "rsd_percent": 17.201,
                     "values": [0.005643, 0.004422, 0.004414, 0.004037, 0.003327]}
    overhead = tests["testWrappedSpecificationOverhead"]
    assert overhead["Memory Peak Physical, kB"]["average"] == 23128.326
    assert overhead["CPU Time, s"]["values"][0] == 0.016194 and overhead["status"] == "passed"


def test_pooled_stats_of_device_rounds():
    a, b = latency_stats([1.0, 2.0, 3.0]), latency_stats([4.0, 5.0])
    assert pooled_stats([a, b])["samples"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    x, y = aggregate_stats(10, 2.0, 0.5, 1.5, 3.0), aggregate_stats(30, 4.0, 0.5, 3.0, 5.0)
    pooled = pooled_stats([x, y])
    assert pooled["n"] == 40 and pooled["mean"] == pytest.approx(3.5) and pooled["p50"] is None
    assert pooled["std"] == pytest.approx((0.25 + (10 * 2.25 + 30 * 0.25) / 40) ** 0.5)
    assert (pooled["min"], pooled["max"], pooled["run_means"]) == (1.5, 5.0, [2.0, 4.0])
