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
MLModel.predict by `edgekd bench --device host` on a Mac (targets/ios.py). Decoder LM exports go through the
app's LLM tests instead (`measure_decoders`: copied into Resources as <export folder name>_llm.pte).
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

BUILD_FOR_LLM_TESTING = (
    "copy each decoder export's .pte into extension/benchmark/apple/Benchmark/Resources as <export folder "
    "name>_llm.pte (the app's LLM tests take .pte files whose name holds 'llm') and its tokenizer.json beside them, "
    "then run "
    "xcodebuild build-for-testing as for any .pte (edgekd's README, Benchmarks); the .xctestrun is under "
    "build/ios-bench/Build/Products")


def llm_resource(export) -> str:
    """The name a decoder export's .pte has in the Benchmark app's Resources (BUILD_FOR_LLM_TESTING)."""
    return f"{export.name}_llm.pte"


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

    def _xcodebuild(self, settings: Settings, build: str) -> tuple[str, int | None, str | None]:
        """Run the built tests on the iPhone: (output, exit code or None after a timeout, the timeout's error)."""
        xctestrun = settings.options.get("xctestrun")
        if not self.udid:
            raise BenchError("give the iPhone as --device ios:UDID (`xcrun xctrace list devices` lists them)")
        if not xctestrun or not Path(xctestrun).is_file():
            raise BenchError(f"--xctestrun {xctestrun or '(not given)'}: no such file; {build}")
        cmd = ["xcodebuild", "test-without-building", "-xctestrun", str(xctestrun), "-destination", f"id={self.udid}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=settings.timeout)
            return proc.stdout + proc.stderr, proc.returncode, None
        except FileNotFoundError:
            raise BenchError("xcodebuild is not on PATH: install Xcode and run `xcode-select --install`") from None
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            return output, None, str(DeviceFault(f"xcodebuild did not finish within {settings.timeout:g} s "
                                                 f"(--timeout): the device or a test hangs"))

    def measure(self, artifacts: list[Artifact], settings: Settings, cache: Path) -> Measurement:
        skipped = [{"name": a.name, "reason": "the Benchmark app runs .pte files; time a Core ML .mlpackage with "
                                              "`edgekd bench --device host` on a Mac"}
                   for a in artifacts if a.file.suffix != ".pte"]
        todo = [a for a in artifacts if a.file.suffix == ".pte"]
        output, code, error = self._xcodebuild(settings, BUILD_FOR_TESTING)
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
        error = _run_error(error, code, output, todo, results, "forward", BUILD_FOR_TESTING)
        return Measurement(results, skipped, machine, error, [a.name for a in todo])

    def measure_decoders(self, exports: list, settings: Settings, prompt_lengths, new_tokens: int, seed: int) -> dict:
        """Decoder exports through the Benchmark app's LLM tests (Tests/LLM/LLMTests.mm): each model with the
        tokenizer.json in Resources, one `generate` test measured with its TokensPerSecondMetric ("Tokens Per
        Second, t/s": the tokens of one whole generation, prefill included, over its time), XCTClockMetric and
        XCTMemoryMetric. Its prompt ("Once upon a time") and length (sequence length 50) are the app's own:
        --prompt-tokens and --new-tokens do not reach it, and the result says so."""
        from edgekd.benchmarks.llm import SCHEMA, decoder_ratios

        if settings.baselines:
            raise BenchError("--baselines run on the host; an iPhone measures the exports alone")
        tokenizers = {(e.path / "tokenizer.json").read_bytes() for e in exports
                      if (e.path / "tokenizer.json").is_file()}
        if len(tokenizers) > 1:
            raise BenchError("these exports have different tokenizers, and the Benchmark app pairs every model in "
                             "Resources with every tokenizer there: bench exports of one tokenizer together")
        output, code, error = self._xcodebuild(settings, BUILD_FOR_LLM_TESTING)
        tests = parse_xcodebuild(output)
        results = []
        for export in exports:
            token = _token(llm_resource(export))
            name, test = next(((n, t) for n, t in tests.items() if n.startswith("test_generate_") and token in n),
                              (None, None))
            speed = (test or {}).get("Tokens Per Second, t/s")
            if not speed or test.get("status") == "failed":
                continue
            clock, memory = test.get("Clock Monotonic Time, s"), test.get("Memory Peak Physical, kB")
            results.append({
                "name": export.name, "model": export.model, "runtime": "executorch", "quant": export.quant,
                "runner": "ExecuTorch Benchmark app (XCTest LLMTests)", "path": str(export.file),
                "size_bytes": export.file.stat().st_size, "test": name,
                "generate_tokens_per_s": latency_stats(speed["values"])["p50"],
                "by_prompt_tokens": {}, "generate_tokens_per_s_stats": latency_stats(speed["values"]),
                "generate_ms": latency_stats([v * 1e3 for v in clock["values"]]) if clock else None,
                "peak_rss_mb": round(memory["average"] / 1024, 1) if memory else None,  # kB, as the host's MB
                "runs_planned": 1, "runs_done": 1})
        error = _run_error(error, code, output, exports, results, "generate", BUILD_FOR_LLM_TESTING)
        result = {"schema": SCHEMA, "results": results, "skipped": [], "ratios": decoder_ratios(results),
                  "ratios_at_prompt_tokens": None,
                  "prompts": {"kind": "the Benchmark app's own", "prompt": "Once upon a time", "sequence_length": 50,
                              "note": "--prompt-tokens and --new-tokens do not reach the app's LLM test"},
                  "machine": {"device": f"ios:{self.udid}", "os": "iOS (from the test names)", "cpu": None},
                  "complete": error is None, "finished": [r["name"] for r in results],
                  "expected": [e.name for e in exports]}
        if error:
            result["error"] = error
        return result


def _run_error(error, code, output: str, expected: list, results: list[dict], test: str, build: str):
    """The run's one line: a timeout as it was, xcodebuild's own failure when nothing was measured, else the
    artifacts without a `test` measurement (not in this xctestrun, or their test failed); None when all were."""
    missing = [a.name for a in expected if a.name not in {r["name"] for r in results}]
    if error is None and code not in (None, 0) and not results:
        error = f"xcodebuild failed (exit {code}): {_last_error(output)}"
    if error is None and missing:
        error = (f"no {test} measurement for {', '.join(missing)} in xcodebuild's output (not in this xctestrun, "
                 f"or its test failed): {build}")
    return error


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if "error" in ln.lower()]
    return (lines[-1] if lines else (output.strip().splitlines() or ["no output"])[-1])[:160]


DEVICES.register("ios")(IOSDevice)
