"""Android over adb: `edgekd bench ART... --device android[:SERIAL] --out DIR`.

What runs each artifact on the phone:

- ExecuTorch `.pte`: `executor_runner` built for Android (`--executor-runner PATH`), pushed to
  /data/local/tmp/edgekd and run with --model_path, --num_executions, --cpu_threads and --inputs
  (the artifact's sample text as raw int32 files). It logs through ExecuTorch's PAL: to logcat,
  tag ExecuTorch, in Android builds (runtime/platform/default/android.cpp), or to stderr in the
  posix format; both are read. Or ExecuTorch's benchmark app (`--android-runner minibench`,
  org.pytorch.minibench), started with `am start` and read back with `run-as ... cat`.
- LiteRT `.tflite`: `benchmark_model` (`--benchmark-model PATH`) with --use_xnnpack=true; its
  "Replacing N out of M node(s) with delegate (TfLiteXNNPackDelegate)" line is checked, so a model
  that silently runs on CPU kernels is reported, not timed as if delegated.

Runs are interleaved: with --rounds R each artifact runs R times, A B A B ..., iterations split
between the rounds; --cooldown S idles before each run; every adb command has --timeout. Device
model, Android version, ABI and the CPU frequencies before and after each run are recorded.
Nothing here has been run on a phone: the parsers are tested on the tools' verbatim output and the
wire on a fake adb (tests/fake_adb.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekd.benchmarks.devices import DEVICES, Artifact, DeviceFault, Measurement, Settings
from edgekd.benchmarks.stats import aggregate_stats, latency_stats, pooled_stats
from edgekd.errors import BenchError

DEVICE_DIR = "/data/local/tmp/edgekd"
MINIBENCH = "org.pytorch.minibench"
MINIBENCH_DIR = "/data/local/tmp/minibench"

BUILD_EXECUTOR_RUNNER = (
    "build it from an ExecuTorch checkout with the Android NDK: cmake . -DCMAKE_TOOLCHAIN_FILE="
    "$ANDROID_NDK/build/cmake/android.toolchain.cmake --preset android-arm64-v8a -DANDROID_PLATFORM=android-26 "
    "-DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_KERNELS_QUANTIZED=ON "
    "-DEXECUTORCH_BUILD_EXTENSION_EVALUE_UTIL=ON -DEXECUTORCH_BUILD_EXTENSION_RUNNER_UTIL=ON "
    "-DEXECUTORCH_ENABLE_LOGGING=ON -DCMAKE_BUILD_TYPE=Release -B cmake-out-android && cmake --build "
    "cmake-out-android --target executor_runner, then pass --executor-runner cmake-out-android/executor_runner")
GET_BENCHMARK_MODEL = (
    "get LiteRT's prebuilt android_aarch64 benchmark_model (LiteRT docs, 'Performance measurement') or build it "
    "with bazel build -c opt --config=android_arm64 //tflite/tools/benchmark:benchmark_model in the LiteRT "
    "repository, then pass --benchmark-model PATH")
BUILD_MINIBENCH = (
    f"{MINIBENCH} is not installed on the phone: build ExecuTorch's benchmark app "
    "(extension/benchmark/android/benchmark: ./gradlew :app:installDebug) or use --android-runner executor_runner")

# ---------------------------------------------------------------- parsers (verbatim tool output)
# executor_runner.cpp (examples/portable/executor_runner): ET_LOG format strings; matched inside a
# line so both the posix prefix "I 00:00:00.000123 executorch:executor_runner.cpp:NNN] " and
# logcat's "MM-DD hh:mm:ss.mmm PID TID I ExecuTorch: " are accepted.
_ET_LOADED = re.compile(r"Model loaded in ([0-9.]+) ms\.")
_ET_ITERATION = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
_ET_DONE = re.compile(r"Model executed successfully (\d+) time\(s\)(?: in ([0-9.]+) ms)?\.")
_ET_THREADS = re.compile(r"Resetting threadpool (?:with num threads = |to )(\d+)")
_ET_FAILED = re.compile(r"(Execution of method \S+ failed with status 0x[0-9a-fA-F]+|Loading of method \S+ failed "
                        r"with status 0x[0-9a-fA-F]+|Missing operator: \S+|Failed to parse model file \S+|"
                        r"FileDataLoader::from\(\) failed: 0x[0-9a-fA-F]+|Extra commandline args:.*|"
                        r"unknown command line flag '[^']+')")


def parse_executor_runner(text: str) -> dict:
    """executor_runner's log -> {executions, samples (ms, one per iteration when the runner logs
    them), total_ms, load_ms, threads, error}; a log without the "executed successfully" line
    has `error` set (the runner stopped early)."""
    done = _ET_DONE.search(text)
    samples = [float(m.group(3)) for m in _ET_ITERATION.finditer(text)]
    failed = _ET_FAILED.search(text)
    loaded, threads = _ET_LOADED.search(text), _ET_THREADS.search(text)
    result = {"executions": int(done.group(1)) if done else None,
              "total_ms": float(done.group(2)) if done and done.group(2) else None,
              "samples": samples, "load_ms": float(loaded.group(1)) if loaded else None,
              "threads": int(threads.group(1)) if threads else None, "error": None}
    if not done:
        result["error"] = failed.group(1) if failed else "no 'Model executed successfully' line in its log"
    return result


_BM_COUNT = re.compile(r"count=(\d+) first=(\d+) curr=(\d+) min=(\d+) max=(\d+) avg=([0-9.e+]+) std=(\d+)")
_BM_TIMINGS = re.compile(r"Inference timings in us: Init: ([0-9.e+]+), First inference: ([0-9.e+]+), "
                         r"Warmup \(avg\): ([0-9.e+]+), Inference \(avg\): ([0-9.e+]+)")
_BM_DELEGATE = re.compile(r"Replacing (\d+)(?: out of (\d+))? node\(s\) with delegate \((\w+)\) node, "
                          r"yielding (\d+) partitions")
_BM_MEMORY = re.compile(r"(Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): "
                        r"init=([0-9.e+]+) overall=([0-9.e+]+)")
_BM_THREADS = re.compile(r"(?:#threads used for CPU inference|Num threads): \[(\d+)\]")
_BM_FAILED = re.compile(r"(Failed to apply \w+ delegate\.|Benchmarking failed\.|Failed to (?:mmap|load) model.*|"
                        r"ERROR: .*)")


def parse_benchmark_model(text: str) -> dict:
    """LiteRT benchmark_model's output -> {latency (aggregate, ms), load_ms, first_ms, memory_mb,
    delegation, threads, error}. benchmark_model keeps no per-run times: p50/p90 stay unknown."""
    runs = _BM_COUNT.findall(text)
    timings = _BM_TIMINGS.search(text)
    result = {"latency_ms": None, "load_ms": None, "first_ms": None, "memory_mb": None, "delegation": None,
              "threads": None, "error": None}
    if not runs or not timings:
        failed = _BM_FAILED.search(text)
        result["error"] = failed.group(1) if failed else "no 'Inference timings in us' line in its output"
        return result
    count, first, _curr, low, high, avg, std = runs[-1]  # the last count= line is the timed run, before it warm-up
    result["latency_ms"] = aggregate_stats(int(count), float(avg) / 1e3, float(std) / 1e3, int(low) / 1e3,
                                           int(high) / 1e3)
    result["load_ms"], result["first_ms"] = float(timings.group(1)) / 1e3, float(timings.group(2)) / 1e3
    memory = _BM_MEMORY.search(text)
    if memory:
        result["memory_mb"] = {"measure": memory.group(1), "init": float(memory.group(2)),
                               "overall": float(memory.group(3))}
    threads = _BM_THREADS.search(text)
    result["threads"] = int(threads.group(1)) if threads else None
    delegations = [m for m in _BM_DELEGATE.finditer(text) if "XNNPack" in m.group(3) or "XNNPACK" in m.group(3)]
    if not delegations:
        result["delegation"] = {"delegate": None, "cpu_fallback": True,
                                "note": "no node was replaced by the XNNPACK delegate: the model ran on CPU kernels"}
    else:
        m = delegations[-1]
        replaced, total = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        result["delegation"] = {"delegate": m.group(3), "replaced_nodes": replaced, "total_nodes": total,
                                "partitions": int(m.group(4)), "cpu_fallback": total is not None and replaced < total}
    return result


_MINIBENCH_METRICS = {"avg_inference_latency(ms)": "avg", "trimmean_inference_latency(ms)": "trimmean",
                      "model_load_time(ms)": "load", "load_status": "status", "ram_pss_usage(mb)": "pss"}


def parse_minibench(text: str, iterations: int) -> dict:
    """files/benchmark_results.json of org.pytorch.minibench (a Gson list of BenchmarkMetric) ->
    {latency (aggregate: mean of all runs, and the 10-90 % trimmed mean), load_ms, pss_mb, device, error}."""
    try:
        rows = json.loads(text)
        values = {_MINIBENCH_METRICS[r["metric"]]: float(r["actualValue"]) for r in rows
                  if r.get("metric") in _MINIBENCH_METRICS}
        info = rows[0].get("deviceInfo", {}) if rows else {}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return {"error": f"benchmark_results.json is not the app's metric list ({type(exc).__name__})"}
    result = {"load_ms": values.get("load"), "pss_mb": values.get("pss"), "latency_ms": None,
              "device": {k: info.get(k) for k in ("device", "arch", "os")}, "error": None}
    if values.get("status", 0) != 0:
        result["error"] = f"the app could not load the model (load_status {int(values['status'])})"
    elif "avg" not in values:
        result["error"] = "benchmark_results.json has no avg_inference_latency(ms)"
    else:
        result["latency_ms"] = aggregate_stats(iterations, values["avg"], trimmean_10_90=values.get("trimmean"))
    return result


# ---------------------------------------------------------------- transport
_GONE = re.compile(r"device '[^']*' not found|no devices/emulators found|device offline|error: closed|"
                   r"device unauthorized|protocol fault|connection reset")


class Adb:
    """`adb [-s SERIAL] ...` with a timeout on every command. A vanished device or a command that
    does not answer raises DeviceFault; a missing adb says how to get it."""

    def __init__(self, serial: str | None, timeout: float, adb: str = "adb"):
        self.serial, self.timeout, self.adb = serial, timeout, adb

    def __call__(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        cmd = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        limit = timeout or self.timeout
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=limit)
        except FileNotFoundError:
            raise BenchError("adb is not on PATH: install Android SDK platform-tools and put adb on PATH") from None
        except subprocess.TimeoutExpired:
            raise DeviceFault(f"`adb {' '.join(args)[:120]}` did not answer within {limit:g} s (--timeout): the "
                              f"device or the runner hangs") from None
        if proc.returncode != 0 and _GONE.search(proc.stdout + proc.stderr):
            raise DeviceFault(f"Android device {self.serial or ''} disconnected during `adb {' '.join(args)[:80]}` "
                              f"({_GONE.search(proc.stdout + proc.stderr).group(0)})".replace("  ", " "))
        return proc

    def shell(self, command: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return self("shell", command, timeout=timeout)

    def select(self) -> str:
        """The serial to use: the one given, or the only device attached."""
        listed = self("devices").stdout.splitlines()
        devices = dict(line.split()[:2] for line in listed[1:] if len(line.split()) >= 2)
        if self.serial is None:
            ready = [s for s, state in devices.items() if state == "device"]
            if not devices:
                raise BenchError("no Android device attached (`adb devices` lists none): connect a phone with USB "
                                 "debugging on, or start an emulator")
            if len(ready) > 1:
                raise BenchError(f"several Android devices attached ({', '.join(ready)}): pick one with "
                                 f"--device android:SERIAL")
            self.serial = ready[0] if ready else next(iter(devices))
        state = devices.get(self.serial)
        if state is None:
            known = ", ".join(devices) or "none"
            raise BenchError(f"Android device '{self.serial}' is not attached (`adb devices` lists: {known})")
        if state != "device":
            fix = {"unauthorized": "accept the USB debugging prompt on the phone",
                   "offline": "reconnect it"}.get(state, "check the connection")
            raise BenchError(f"Android device '{self.serial}' is {state}: {fix}")
        return self.serial

    def prop(self, name: str) -> str | None:
        value = self.shell(f"getprop {name}").stdout.strip()
        return value or None

    def cpu_freqs_khz(self) -> list[int] | None:
        out = self.shell("cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq").stdout
        values = [int(v) for v in out.split() if v.isdigit()]
        return values or None  # some phones refuse the read outside root: not recorded then

    def push(self, local: Path, remote: str) -> None:
        proc = self("push", str(local), remote)
        if proc.returncode != 0:
            raise BenchError(f"adb push {Path(local).name} failed: {(proc.stderr or proc.stdout).strip()[:160]}")


# ---------------------------------------------------------------- the device
def _input_files(artifact: Artifact, folder: Path) -> list[Path]:
    """The artifact's sample input as raw little-endian int32 files, one per model input, in order.

    Padded to max_length (mask 0: the same logits) for a dynamic-length `.pte`: executor_runner sizes its input
    tensors at the program's upper bound, so on the phone it is timed at max_length, like a fixed-length one."""
    files = []
    manifest = artifact.manifest
    for name in ("input_ids", "attention_mask"):
        values = list(manifest["sample_input"][name])
        if manifest.get("dynamic_length"):
            values += [0] * (manifest["max_length"] - len(values))
        file = folder / f"{artifact.name}.{name}.bin"
        file.write_bytes(np.asarray(values, dtype="<i4").tobytes())
        files.append(file)
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no output"


class AndroidDevice:
    def __init__(self, serial: str | None = None, sleep=time.sleep):
        self.serial, self.sleep = serial, sleep

    def _runner_for(self, art: Artifact, settings: Settings) -> str | None:
        suffix = art.file.suffix
        if suffix == ".pte" and art.fmt.target != "ios":
            return settings.options.get("android_runner") or "executor_runner"
        if suffix == ".tflite" and art.fmt.target == "android":
            return "benchmark_model"
        return None

    def _binary(self, settings: Settings, key: str, how: str) -> Path:
        given = settings.options.get(key)
        flag = "--" + key.replace("_", "-")
        if not given:
            raise BenchError(f"{key} is needed for this artifact and {flag} was not given; {how}")
        path = Path(given)
        if not path.is_file():
            raise BenchError(f"{flag} {given}: no such file; {how}")
        return path

    def measure(self, artifacts: list[Artifact], settings: Settings, cache: Path) -> Measurement:
        adb = Adb(self.serial, settings.timeout)
        runners, skipped = {}, []
        for art in artifacts:
            runner = self._runner_for(art, settings)
            if runner is None:
                skipped.append({"name": art.name, "reason": f"{art.fmt.target}/{art.fmt.name} does not run on "
                                                           f"Android (measure it on its own device)"})
            else:
                runners[art.name] = runner
        # Every missing piece is named before anything touches the phone.
        binaries = {}
        if "executor_runner" in runners.values():
            binaries["executor_runner"] = self._binary(settings, "executor_runner", BUILD_EXECUTOR_RUNNER)
        if "benchmark_model" in runners.values():
            binaries["benchmark_model"] = self._binary(settings, "benchmark_model", GET_BENCHMARK_MODEL)
        serial = adb.select()
        if "minibench" in runners.values() and "package:" not in adb.shell(f"pm path {MINIBENCH}").stdout:
            raise BenchError(BUILD_MINIBENCH)
        machine = {"device": f"android:{serial}", "model": adb.prop("ro.product.model"),
                   "manufacturer": adb.prop("ro.product.manufacturer"),
                   "android": adb.prop("ro.build.version.release"), "abi": adb.prop("ro.product.cpu.abi"),
                   "soc": adb.prop("ro.soc.model"), "threads": settings.threads or "runner default",
                   "cpu_freq_khz_start": adb.cpu_freqs_khz()}
        machine["os"] = f"Android {machine['android']}"
        machine["cpu"] = " ".join(str(x) for x in (machine["manufacturer"], machine["model"], machine["soc"]) if x)
        todo = [a for a in artifacts if a.name in runners]
        expected = [a.name for a in todo]
        rows = {a.name: self._row(a, runners[a.name], binaries, settings) for a in todo}
        parts: dict[str, list[dict]] = {a.name: [] for a in todo}
        error = None
        per_round = math.ceil(settings.iterations / settings.rounds)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                adb.shell(f"mkdir -p {DEVICE_DIR}")
                for name, binary in binaries.items():
                    adb.push(binary, f"{DEVICE_DIR}/{name}")
                    adb.shell(f"chmod 755 {DEVICE_DIR}/{name}")
                for art in todo:
                    if runners[art.name] != "minibench":
                        adb.push(art.file, f"{DEVICE_DIR}/{art.file.name}")
                        for file in _input_files(art, Path(tmp)):
                            adb.push(file, f"{DEVICE_DIR}/{file.name}")
                for art in todo:  # warm-up: one untimed run each, so the first timed run finds caches as the rest
                    if settings.warmup and runners[art.name] == "executor_runner":
                        warm = self._run(adb, art, "executor_runner", settings, settings.warmup)
                        if warm.get("error"):
                            rows[art.name]["error"] = warm["error"]
                            error = error or warm["error"]
                for _ in range(settings.rounds):
                    for art in todo:
                        if rows[art.name].get("error"):  # crashed in an earlier round
                            continue
                        self.sleep(settings.cooldown)
                        before = adb.cpu_freqs_khz()
                        run = self._run(adb, art, runners[art.name], settings, per_round)
                        run["cpu_freq_khz"] = {"before": before, "after": adb.cpu_freqs_khz()}
                        if run.get("error"):  # the runner crashed or refused: this variant stops, the others go on
                            rows[art.name]["error"] = run["error"]
                            error = error or run["error"]
                            continue
                        parts[art.name].append(run)
        except DeviceFault as fault:
            error = str(fault)
        results = [self._finish(rows[a.name], parts[a.name], settings) for a in todo if parts[a.name]]
        machine["cpu_freq_khz_end"] = None if error else adb.cpu_freqs_khz()
        return Measurement(results, skipped, machine, error, expected)

    def _row(self, art: Artifact, runner: str, binaries: dict, settings: Settings) -> dict:
        runtime = {"executor_runner": "executorch", "minibench": "executorch", "benchmark_model": "litert"}[runner]
        versions = {"runner": runner}
        if runner in binaries:
            versions["runner_sha256"] = _sha256(binaries[runner])[:16]
        return {"name": art.name, "kind": "artifact", "artifact": str(art.file), "quant": art.quant,
                "size_bytes": art.manifest.get("size_bytes"), "runtime": runtime, "runner": runner,
                "versions": versions, "runs_planned": settings.rounds}

    def _run(self, adb: Adb, art: Artifact, runner: str, settings: Settings, iterations: int) -> dict:
        if runner == "executor_runner":
            inputs = ",".join(f"{DEVICE_DIR}/{art.name}.{n}.bin" for n in ("input_ids", "attention_mask"))
            adb("logcat", "-c")
            command = (f"{DEVICE_DIR}/executor_runner --model_path={DEVICE_DIR}/{shlex.quote(art.file.name)} "
                       f"--num_executions={iterations} --cpu_threads={settings.threads or -1} --inputs={inputs}")
            proc = adb.shell(command)
            # Android builds log to logcat; a posix-PAL build logs to stderr: read the runner's own output
            # first and logcat only when the runner printed no result line itself.
            parsed = parse_executor_runner(proc.stdout + proc.stderr)
            if parsed["executions"] is None:
                parsed = parse_executor_runner(adb("logcat", "-d", "-s", "ExecuTorch:I").stdout)
            if proc.returncode != 0 or parsed["error"]:
                detail = parsed["error"] if parsed["error"] != "no 'Model executed successfully' line in its log" \
                    else _tail(proc)
                return {"error": f"executor_runner failed on {art.name} (exit {proc.returncode}): {detail}"}
            if parsed["samples"]:
                latency = latency_stats(parsed["samples"])
            elif parsed["total_ms"] is not None:  # an older runner logs only the total of the timed runs
                latency = aggregate_stats(parsed["executions"], parsed["total_ms"] / parsed["executions"])
            else:
                return {"error": f"executor_runner on {art.name} logged no timing (an old build? rebuild it: "
                                 f"{BUILD_EXECUTOR_RUNNER})"}
            return {"latency_ms": latency, "load_ms": parsed["load_ms"], "threads": parsed["threads"]}
        if runner == "benchmark_model":
            names = art.manifest["delegation"].get("input_names") or ["input_ids", "attention_mask"]
            files = ",".join(f"{tensor}:{DEVICE_DIR}/{art.name}.{n}.bin"
                             for tensor, n in zip(names, ("input_ids", "attention_mask")))
            command = (f"{DEVICE_DIR}/benchmark_model --graph={DEVICE_DIR}/{shlex.quote(art.file.name)} "
                       f"--num_threads={settings.threads or -1} --num_runs={iterations} "
                       f"--warmup_runs={settings.warmup} --use_xnnpack=true --input_layer_value_files={files}")
            proc = adb.shell(command)
            parsed = parse_benchmark_model(proc.stdout + proc.stderr)
            if proc.returncode != 0 or parsed["error"]:
                return {"error": f"benchmark_model failed on {art.name} (exit {proc.returncode}): "
                                 f"{parsed['error'] or _tail(proc)}"}
            return {"latency_ms": parsed["latency_ms"], "load_ms": parsed["load_ms"], "first_ms": parsed["first_ms"],
                    "memory_mb": parsed["memory_mb"], "delegation": parsed["delegation"], "threads": parsed["threads"]}
        return self._run_minibench(adb, art, settings, iterations)

    def _run_minibench(self, adb: Adb, art: Artifact, settings: Settings, iterations: int) -> dict:
        # The app benchmarks the first .pte in model_dir: the folder holds exactly this one.
        adb.shell(f"rm -rf {MINIBENCH_DIR} && mkdir -p {MINIBENCH_DIR}")
        adb.push(art.file, f"{MINIBENCH_DIR}/{art.file.name}")
        adb.shell(f"run-as {MINIBENCH} rm -f files/benchmark_results.json")
        adb.shell(f"am start -W -S -n {MINIBENCH}/.BenchmarkActivity --es model_dir {MINIBENCH_DIR} "
                  f"--ei num_iter {iterations} --ei num_warm_up_iter {settings.warmup}")
        deadline = time.monotonic() + settings.timeout
        while True:  # the activity writes its results when it finishes, after `am start` returned
            proc = adb.shell(f"run-as {MINIBENCH} cat files/benchmark_results.json")
            if proc.returncode == 0 and proc.stdout.strip().startswith("["):
                break
            if time.monotonic() > deadline:
                raise DeviceFault(f"the minibench app wrote no results for {art.name} within {settings.timeout:g} s "
                                  f"(--timeout): it hangs or crashed")
            self.sleep(1.0)
        parsed = parse_minibench(proc.stdout, iterations)
        if parsed["error"]:
            return {"error": f"minibench failed on {art.name}: {parsed['error']}"}
        return {"latency_ms": parsed["latency_ms"], "load_ms": parsed["load_ms"], "pss_mb": parsed["pss_mb"]}

    def measure_decoders(self, exports: list, settings: Settings, prompt_lengths, new_tokens: int, seed: int) -> dict:
        """Decoder exports with ExecuTorch's llama_main and LiteRT-LM's litert_lm_main (benchmarks/android_llm.py)."""
        from edgekd.benchmarks.android_llm import measure_decoders

        if settings.baselines:
            raise BenchError("--baselines run on the host; a phone measures the exports alone")
        return measure_decoders(self.serial, exports, settings, prompt_lengths, new_tokens, seed, self.sleep)

    @staticmethod
    def _finish(row: dict, runs: list[dict], settings: Settings) -> dict:
        row = dict(row)
        row.pop("error", None)
        row["runs_done"] = len(runs)
        row["latency_ms"] = pooled_stats([r["latency_ms"] for r in runs])
        loads = [r["load_ms"] for r in runs if r.get("load_ms") is not None]
        row["load_ms"] = float(np.median(loads)) if loads else None
        row["threads"] = next((r["threads"] for r in runs if r.get("threads")), settings.threads or None)
        for key in ("delegation", "memory_mb", "pss_mb", "first_ms"):
            if runs[-1].get(key) is not None:
                row[key] = runs[-1][key]
        row["runs"] = [{k: v for k, v in r.items() if k != "latency_ms"} |
                       {"latency_ms": {k: v for k, v in r["latency_ms"].items() if k != "samples"}} for r in runs]
        return row


DEVICES.register("android")(AndroidDevice)
