"""`edgekd bench --device ios`: one line on Linux; on "macOS" (the module's platform stood in for) a fake
xcodebuild prints XCTest's lines for ExecuTorch's Benchmark app (test names as its README gives them)."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from edgekd.benchmarks import ios
from edgekd.cli import main
from edgekd.manifest import read_manifest, verify_stage

pytest.importorskip("executorch")
UDID = "00008120-001A2B3C4D5E6F70"

# A test line of the Benchmark app as XCTest prints it (format: tests/fixtures/bench/xcodebuild_*.txt);
# names: test_<TestName>_<Resource>_<OS>_<Version>_<DeviceModel> (extension/benchmark/apple/Benchmark/README.md).
FAKE = r'''import sys, pathlib
args = sys.argv[1:]
pathlib.Path(sys.argv[0]).with_name("args.txt").write_text(" ".join(args))
mode, models = {mode!r}, {models!r}
if mode == "hang":
    import time; time.sleep(60)
for i, model in enumerate(models):
    for test, values in (("load", [0.021, 0.019, 0.020, 0.020, 0.020]),
                         ("forward", [0.0021 + 0.0001 * k + i / 1000 for k in range(5)])):
        name = f"test_{{test}}_{{model}}_iOS_18_1_iPhone15_4"
        avg = sum(values) / len(values)
        print(f"Test Case '-[GenericTests {{name}}]' started.")
        print(f"<unknown>:0: Test Case '-[GenericTests {{name}}]' measured [Clock Monotonic Time, s] average: "
              f"{{avg:.3f}}, relative standard deviation: 1.234%, values: [{{', '.join(f'{{v:.6f}}' for v in values)}}], "
              f"performanceMetricID:com.apple.dt.XCTMetric_Clock.time.monotonic, baselineName: \"\", baselineAverage: , "
              f"polarity: prefers smaller, maxPercentRegression: 10.000%, maxPercentRelativeStandardDeviation: 10.000%, "
              f"maxRegression: 0.000, maxStandardDeviation: 0.000")
        print(f"<unknown>:0: Test Case '-[GenericTests {{name}}]' measured [Memory Peak Physical, kB] average: "
              f"40960.000, relative standard deviation: 0.000%, values: [40960.000000, 40960.000000], "
              f"performanceMetricID:com.apple.dt.XCTMetric_Memory.physical_peak")
        print(f"Test Case '-[GenericTests {{name}}]' passed (1.234 seconds).")
print("** TEST EXECUTE SUCCEEDED **")
'''


def resource(export_dir) -> str:
    """The .pte's name as the Benchmark app's ResourceTestCase.m puts it in a test name (punctuation -> '_')."""
    return re.sub(r"[^A-Za-z0-9]", "_", read_manifest(export_dir)["artifact"])


def install_xcodebuild(tmp_path, monkeypatch, models, mode="ok"):
    folder = tmp_path / "xcode"
    folder.mkdir()
    (folder / "fake.py").write_text(FAKE.format(mode=mode, models=models))
    shim = folder / "xcodebuild"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{folder / "fake.py"}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(ios, "PLATFORM", "darwin")
    xctestrun = tmp_path / "Benchmark_iphoneos18.1-arm64.xctestrun"
    xctestrun.write_text("<plist/>")
    return folder, xctestrun


def test_ios_on_linux_is_one_line(bench_exports, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ios, "PLATFORM", "linux")
    assert main(["bench", str(bench_exports["et-fp32"]), "--device", f"ios:{UDID}", "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == ("error: --device ios needs macOS with Xcode (xcodebuild); this machine runs "
                                       "linux: run the same command on a Mac with the iPhone attached\n")
    assert not (tmp_path / "b").exists()


def test_ios_bench_through_xcodebuild(bench_exports, tmp_path, capsys, monkeypatch):
    arts = [bench_exports["et-fp32"], bench_exports["et-int8"], bench_exports["litert-fp32"]]
    folder, xctestrun = install_xcodebuild(tmp_path, monkeypatch, [resource(a) for a in arts[:2]])
    out = tmp_path / "bench"
    assert main(["bench", *map(str, arts), "--device", f"ios:{UDID}", "--xctestrun", str(xctestrun), "--out",
                 str(out), "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert (folder / "args.txt").read_text() == f"test-without-building -xctestrun {xctestrun} -destination id={UDID}"
    rows = {r["name"]: r for r in result["results"]}
    fp32 = rows[arts[0].name]
    assert fp32["latency_ms"]["samples"] == [2.1, 2.2, 2.3, 2.4, 2.5] and fp32["latency_ms"]["p50"] == 2.3
    assert fp32["load_ms"] == pytest.approx(20.0) and fp32["peak_memory_mb"] == 40.0
    assert rows[arts[1].name]["latency_ms"]["samples"][0] == pytest.approx(3.1)
    assert result["skipped"][0]["name"] == arts[2].name and ".pte" in result["skipped"][0]["reason"]
    assert result["complete"] is True


def test_ios_model_missing_from_the_xctestrun_is_partial(bench_exports, tmp_path, capsys, monkeypatch):
    arts = [bench_exports["et-fp32"], bench_exports["et-int8"]]
    _, xctestrun = install_xcodebuild(tmp_path, monkeypatch, [resource(arts[0])])
    out = tmp_path / "bench"
    assert main(["bench", *map(str, arts), "--device", f"ios:{UDID}", "--xctestrun", str(xctestrun),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no forward measurement for {arts[1].name}" in err and "build-for-testing" in err
    assert verify_stage(out, "bench")["metrics"]["finished"] == [arts[0].name]


def test_ios_hang_times_out(bench_exports, tmp_path, capsys, monkeypatch):
    _, xctestrun = install_xcodebuild(tmp_path, monkeypatch, [], mode="hang")
    assert main(["bench", str(bench_exports["et-fp32"]), "--device", f"ios:{UDID}", "--xctestrun", str(xctestrun),
                 "--timeout", "2", "--out", str(tmp_path / "b")]) == 1
    assert "xcodebuild did not finish within 2 s (--timeout)" in capsys.readouterr().err
