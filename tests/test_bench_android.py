"""`edgekd bench --device android` end to end through a fake adb (tests/fake_adb.py) put first on PATH:
the wire (pushes, runner command lines, logcat, the minibench app) and every device fault. The artifacts
are real exports; nothing runs them here, the fake phone answers in the real tools' formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekd.cli import main
from edgekd.manifest import read_manifest, verify_stage

pytest.importorskip("executorch")

from conftest import FAKE_ADB_SERIAL as SERIAL  # noqa: E402  the fake phone (the `phone` fixture, conftest.py)


@pytest.fixture
def binaries(tmp_path) -> list[str]:
    """Stand-ins for the Android builds of executor_runner and benchmark_model: only pushed, never run here."""
    runner, bench_model = tmp_path / "executor_runner", tmp_path / "benchmark_model"
    runner.write_bytes(b"\x7fELF executor_runner for arm64-v8a")
    bench_model.write_bytes(b"\x7fELF benchmark_model for arm64-v8a")
    return ["--executor-runner", str(runner), "--benchmark-model", str(bench_model)]


def commands(state: Path) -> list[str]:
    return (state / "commands.log").read_text().splitlines() if (state / "commands.log").exists() else []


def test_android_bench_end_to_end(phone, binaries, bench_exports, tmp_path, capsys):
    state = phone("ok")
    arts = [bench_exports["et-fp32"], bench_exports["et-int8"], bench_exports["litert-fp32"]]
    out = tmp_path / "run" / "bench-android"
    code = main(["bench", *map(str, arts), "--device", "android", *binaries, "--iterations", "4", "--warmup", "2",
                 "--rounds", "2", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] is True and result["finished"] == [a.name for a in arts]
    rows = {r["name"]: r for r in result["results"]}
    # Runner calls in order: 2 warm-ups, then rounds of (et-fp32, et-int8, litert); the fake phone's
    # iteration i of call k takes 2.0 + 0.1 k + 0.001 i ms. Two iterations per round (4 over 2 rounds).
    fp32 = rows[arts[0].name]
    assert fp32["latency_ms"]["samples"] == [2.3, 2.301, 2.6, 2.601]
    assert fp32["load_ms"] == pytest.approx((18 + 21) / 2) and fp32["threads"] == 4
    assert fp32["runs_done"] == fp32["runs_planned"] == 2 and fp32["runtime"] == "executorch"
    assert fp32["runs"][0]["cpu_freq_khz"]["before"] == [1803000] * 4 + [2348000] * 2 + [2850000] * 2
    litert = rows[arts[2].name]
    assert litert["runner"] == "benchmark_model" and litert["latency_ms"]["p50"] is None
    assert litert["latency_ms"]["mean"] == pytest.approx((1.85 + 1.88) / 2) and litert["latency_ms"]["n"] == 4
    assert litert["delegation"]["cpu_fallback"] is True and litert["delegation"]["replaced_nodes"] == 131
    assert litert["memory_mb"]["overall"] == 9.5
    machine = read_manifest(out)["machine"]
    assert (machine["model"], machine["android"], machine["abi"]) == ("Pixel 7", "14", "arm64-v8a")
    # The wire: runners and artifacts pushed to /data/local/tmp/edgekd, the sample text as int32 input files.
    log = commands(state)
    assert f"-s {SERIAL} push {binaries[1]} /data/local/tmp/edgekd/executor_runner" in log
    runs = [c for c in log if "/data/local/tmp/edgekd/executor_runner --model_path" in c]
    assert len(runs) == 6 and all("--cpu_threads=-1" in c for c in runs)
    assert [c.split("--num_executions=")[1].split()[0] for c in runs] == ["2", "2", "2", "2", "2", "2"]
    # A dynamic-length .pte (the default) gets its sample padded to max_length, the tensor executor_runner sizes
    exported = read_manifest(arts[0])
    ids, mask = (np.fromfile(state / "device/data/local/tmp/edgekd" / f"{arts[0].name}.{name}.bin", dtype="<i4")
                 for name in ("input_ids", "attention_mask"))
    real = len(exported["sample_input"]["input_ids"])
    assert exported["dynamic_length"] is True and real < exported["max_length"] == len(ids) == len(mask)
    assert ids.tolist() == exported["sample_input"]["input_ids"] + [0] * (exported["max_length"] - real)
    assert mask.tolist() == [1] * real + [0] * (exported["max_length"] - real)
    bm = next(c for c in log if "benchmark_model --graph" in c)
    assert "--use_xnnpack=true" in bm and "--input_layer_value_files=" in bm
    # The report of the device run: means where the tool keeps no per-run times, no CPU-time claim.
    assert main(["report", str(out)]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "CPU time per inference: not measured on a device" in report and "Pixel 7" in report


def test_minibench_app(phone, bench_exports, tmp_path, capsys):
    state = phone("ok")
    out = tmp_path / "bench"
    assert main(["bench", str(bench_exports["et-int8"]), "--device", f"android:{SERIAL}", "--android-runner",
                 "minibench", "--iterations", "30", "--warmup", "3", "--out", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["runner"] == "minibench" and row["latency_ms"]["mean"] == pytest.approx(2.1)
    assert row["latency_ms"]["trimmean_10_90"] == pytest.approx(2.0) and row["pss_mb"] == 14.5
    start = (state / "am_start").read_text()
    assert "-n org.pytorch.minibench/.BenchmarkActivity" in start
    assert "--ei num_iter 30" in start and "--ei num_warm_up_iter 3" in start
    assert list((state / "device/data/local/tmp/minibench").glob("*.pte")) == \
        [state / "device/data/local/tmp/minibench" / bench_exports["et-int8"].joinpath(
            read_manifest(bench_exports["et-int8"])["artifact"]).name]


@pytest.mark.parametrize("mode, message", [
    ("none", "no Android device attached (`adb devices` lists none): connect a phone with USB debugging on, "
             "or start an emulator"),
    ("several", f"several Android devices attached ({SERIAL}, R58M0002): pick one with --device android:SERIAL"),
    ("unauthorized", f"Android device '{SERIAL}' is unauthorized: accept the USB debugging prompt on the phone"),
])
def test_no_usable_device_is_one_line_and_writes_nothing(phone, binaries, bench_exports, tmp_path, capsys, mode,
                                                         message):
    phone(mode)
    out = tmp_path / "bench"
    assert main(["bench", str(bench_exports["et-fp32"]), "--device", "android", *binaries, "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def test_missing_runner_says_how_to_build_it_before_touching_the_phone(phone, bench_exports, tmp_path, capsys):
    state = phone("ok")
    assert main(["bench", str(bench_exports["et-fp32"]), "--device", "android", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "executor_runner is needed for this artifact and --executor-runner was not given" \
        in err and "-DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON" in err and "android.toolchain.cmake" in err
    assert commands(state) == []
    assert main(["bench", str(bench_exports["litert-fp32"]), "--device", "android", "--benchmark-model",
                 str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "--benchmark-model" in err and "no such file" in err and "//tflite/tools/benchmark:benchmark_model" in err


def test_disconnect_mid_run_keeps_the_finished_variant(phone, binaries, bench_exports, tmp_path, capsys):
    phone("disconnect", after=1)  # the first runner call succeeds, then the phone is gone
    arts = [bench_exports["et-fp32"], bench_exports["et-int8"]]
    out = tmp_path / "bench"
    argv = ["bench", *map(str, arts), "--device", "android", *binaries, "--iterations", "3", "--warmup", "0",
            "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Android device {SERIAL} disconnected during `adb shell" in err
    assert f"1 of 2 variants finished, kept in {out} (complete: false)" in err
    metrics = verify_stage(out, "bench")["metrics"]
    assert metrics["complete"] is False and metrics["finished"] == [arts[0].name]
    assert metrics["expected"] == [a.name for a in arts] and "disconnected" in metrics["error"]
    assert [r["name"] for r in metrics["results"]] == [arts[0].name]
    # Reconnected, the same command measures again: a partial result is never taken as done.
    (tmp_path / "adb-state" / "gone").unlink()
    phone("ok")
    assert main(argv) == 0
    assert verify_stage(out, "bench")["metrics"]["complete"] is True


def test_hung_runner_times_out(phone, binaries, bench_exports, tmp_path, capsys):
    phone("hang")
    out = tmp_path / "bench"
    assert main(["bench", str(bench_exports["et-fp32"]), "--device", "android", *binaries, "--warmup", "0",
                 "--timeout", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not answer within 3 s (--timeout): the device or the runner hangs" in err
    assert "no variant finished" in err
    assert verify_stage(out, "bench")["metrics"]["complete"] is False


def test_crashing_runner_is_named_and_the_other_runtime_still_measured(phone, binaries, bench_exports, tmp_path,
                                                                       capsys):
    phone("crash")
    arts = [bench_exports["et-fp32"], bench_exports["litert-fp32"]]
    out = tmp_path / "bench"
    assert main(["bench", *map(str, arts), "--device", "android", *binaries, "--warmup", "0", "--out",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"executor_runner failed on {arts[0].name} (exit 134): Execution of method forward failed with " \
           f"status 0x12" in err
    metrics = verify_stage(out, "bench")["metrics"]
    assert metrics["finished"] == [arts[1].name] and metrics["complete"] is False
