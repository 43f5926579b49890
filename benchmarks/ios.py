"""iPhone (and Mac) through Xcode: `edgekd bench ART... --device ios[:UDID] --xctestrun FILE --out DIR`.

ExecuTorch's Benchmark app (extension/benchmark/apple/Benchmark) turns every .pte in its
Resources folder into XCTest performance tests, `test_load_<file>_...` and
`test_forward_<file>_...` (file name with punctuation as '_'), measured with XCTClockMetric and
XCTMemoryMetric. Build it once for
testing with the artifacts copied into Resources (the README gives the commands), then edgekd runs

    xcodebuild test-without-building -xctestrun FILE -destination id=UDID

and reads XCTest's lines "measured [Clock Monotonic Time, s] average: A, relative standard
deviation: R%, values: [...]" and "measured [Memory Peak Physical, kB] ...". forward's values are
seconds per forward call (one per measured iteration). Core ML .mlpackage files are timed with
MLModel.predict by `edgekd bench --device host` on a Mac (targets/ios.py).
Nothing here has been run on a Mac or an iPhone: the parser is tested on XCTest's verbatim output
and the wire on a fake xcodebuild.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from edgekd.benchmarks.devices import DEVICES, Artifact, DeviceFault, Measurement, Settings
from edgekd.benchmarks.stats import latency_stats
from edgekd.errors import BenchError

PLATFORM = sys.platform  # a module attribute so tests of the wire can stand in for macOS

BUILD_FOR_TESTING = (
    "copy the .pte files into extension/benchmark/apple/Benchmark/Resources of an ExecuTorch checkout and run "
    "xcodebuild build-for-testing -project extension/benchmark/apple/Benchmark/Benchmark.xcodeproj -scheme "
    "Benchmark -destination 'platform=iOS,id=UDID' -testPlan Tests -derivedDataPath build/ios-bench "
    "-allowProvisioningUpdates DEVELOPMENT_TEAM=TEAMID; the .xctestrun is under build/ios-bench/Build/Products")

_MEASURED = re.compile(r"Test Case '-\[(?P<suite>[\w.]+) (?P<test>\w+)\]' measured \[(?P<metric>[^\]]+)\] "
                       r"average: (?P<avg>-?[0-9.]+), relative standard deviation: (?P<rsd>-?[0-9.]+)%, "
                       r"values: \[(?P<values>[^\]]*)\]")
_FINISHED = re.compile(r"Test Case '-\[(?P<suite>[\w.]+) (?P<test>\w+)\]' (?P<status>passed|failed) "
                       r"\((?P<seconds>[0-9.]+) seconds\)")


def parse_xcodebuild(text: str) -> dict[str, dict]:
    """xcodebuild test output -> {test name: {"status", metric name: {"average", "rsd_percent", "values"}}}."""
    tests: dict[str, dict] = {}
    for m in _MEASURED.finditer(text):
        values = [float(v) for v in m.group("values").split(",") if v.strip()]
        tests.setdefault(m.group("test"), {})[m.group("metric")] = {
            "average": float(m.group("avg")), "rsd_percent": float(m.group("rsd")), "values": values}
    for m in _FINISHED.finditer(text):
        tests.setdefault(m.group("test"), {})["status"] = m.group("status")
    return tests


def _token(file_name: str) -> str:
    """A resource file as it appears in a dynamic test name: ResourceTestCase.m joins the parts of the
    file name split at punctuation with '_' (model-x.pte -> model_x_pte)."""
    return re.sub(r"[^\w]|_", "_", file_name)


class IOSDevice:
    def __init__(self, udid: str | None = None):
        if PLATFORM != "darwin":
            raise BenchError(f"--device ios needs macOS with Xcode (xcodebuild); this machine runs {PLATFORM}: run "
                             f"the same command on a Mac with the iPhone attached")
        self.udid = udid

    def measure(self, artifacts: list[Artifact], settings: Settings, cache: Path) -> Measurement:
        xctestrun = settings.options.get("xctestrun")
        if not self.udid:
            raise BenchError("give the iPhone as --device ios:UDID (`xcrun xctrace list devices` lists them)")
        if not xctestrun or not Path(xctestrun).is_file():
            raise BenchError(f"--xctestrun {xctestrun or '(not given)'}: no such file; {BUILD_FOR_TESTING}")
        skipped = [{"name": a.name, "reason": "the Benchmark app runs .pte files; time a Core ML .mlpackage with "
                                              "`edgekd bench --device host` on a Mac"}
                   for a in artifacts if a.file.suffix != ".pte"]
        todo = [a for a in artifacts if a.file.suffix == ".pte"]
        cmd = ["xcodebuild", "test-without-building", "-xctestrun", str(xctestrun), "-destination", f"id={self.udid}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=settings.timeout)
            output, error = proc.stdout + proc.stderr, None
        except FileNotFoundError:
            raise BenchError("xcodebuild is not on PATH: install Xcode and run `xcode-select --install`") from None
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            error = f"xcodebuild did not finish within {settings.timeout:g} s (--timeout): the device or a test hangs"
            proc = None
        tests = parse_xcodebuild(output)
        machine = {"device": f"ios:{self.udid}", "os": "iOS (from the test names)", "cpu": None, "threads": None}
        results = []
        for art in todo:
            token = _token(art.file.name)
            forward = next((t for name, t in tests.items() if name.startswith("test_forward_") and token in name), None)
            load = next((t for name, t in tests.items() if name.startswith("test_load_") and token in name), None)
            clock = (forward or {}).get("Clock Monotonic Time, s")
            if not clock or forward.get("status") == "failed":
                continue
            row = {"name": art.name, "kind": "artifact", "artifact": str(art.file), "quant": art.quant,
                   "size_bytes": art.manifest.get("size_bytes"), "runtime": "executorch",
                   "runner": "ExecuTorch Benchmark app (XCTest)", "versions": {"runner": "xcodebuild"},
                   "latency_ms": latency_stats([v * 1e3 for v in clock["values"]]),
                   "rsd_percent": clock["rsd_percent"]}
            memory = forward.get("Memory Peak Physical, kB")
            if memory:
                row["peak_memory_mb"] = round(memory["average"] / 1024, 1)
            load_clock = (load or {}).get("Clock Monotonic Time, s")
            row["load_ms"] = load_clock["average"] * 1e3 if load_clock else None
            name = next(n for n, t in tests.items() if t is forward)
            row["test"] = name
            results.append(row)
        missing = [a.name for a in todo if a.name not in {r["name"] for r in results}]
        if error is None and proc is not None and proc.returncode != 0 and not results:
            error = f"xcodebuild failed (exit {proc.returncode}): {_last_error(output)}"
        if error is None and missing:
            error = (f"no forward measurement for {', '.join(missing)} in xcodebuild's output (not in this "
                     f"xctestrun, or its test failed): {BUILD_FOR_TESTING}")
        if error and isinstance(error, str) and "did not finish" in error:
            error = str(DeviceFault(error))
        return Measurement(results, skipped, machine, error, [a.name for a in todo])


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if "error" in ln.lower()]
    return (lines[-1] if lines else (output.strip().splitlines() or ["no output"])[-1])[:160]


DEVICES.register("ios")(IOSDevice)
