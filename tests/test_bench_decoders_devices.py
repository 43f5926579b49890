"""Decoder LM exports on devices. Android (benchmarks/android_llm.py): the llama_main parser on the runner's real
output, the prompts, and `edgekd bench --device android --llama-main` through the fake adb (tests/fake_adb.py),
every device fault included. iOS (benchmarks/ios.py): the Benchmark app's LLM tests through a fake xcodebuild.
The exports are stage directories as edgekd writes them, with a stand-in .pte (the fake devices never read it)
and a real tokenizer.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from edgekd.benchmarks.android_litert_lm import parse_litert_lm_benchmark
from edgekd.benchmarks.android_llm import parse_llama_main, prompt_texts
from edgekd.cli import main
from edgekd.manifest import read_manifest, write_stage

from lm_tiny import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def test_the_wheels_runner_output_gives_the_runners_own_rates():
    parsed = parse_llama_main((FIXTURES / "text_llm_runner_wheel.txt").read_text())
    stats = json.loads((FIXTURES / "text_llm_runner_wheel.txt").read_text().split("PyTorchObserver ")[1].split("\n")[0])
    assert parsed["error"] is None
    assert (parsed["prompt_tokens"], parsed["generated_tokens"]) == (25, 7)
    assert parsed["load_ms"] == 30 and parsed["ttft_ms"] == 20  # the log: load 0.030 s, first token 0.020 s
    assert parsed["prefill_tokens_per_s"] == pytest.approx(stats["prefill_token_per_sec"])
    assert parsed["decode_tokens_per_s"] == pytest.approx(stats["decode_token_per_sec"], rel=1e-5)
    assert parsed["rss_mb"] == pytest.approx(668.964844)


def test_an_older_runners_paste_without_rate_fields_gives_the_rates_it_logged():
    parsed = parse_llama_main((FIXTURES / "llama_runner_qnn_pr7175.txt").read_text())
    # Its own log lines: "Prompt evaluation: ... Rate: 553.571429", "Generated 96 tokens: ... Rate: 53.993251"
    assert parsed["prefill_tokens_per_s"] == pytest.approx(553.571429)
    assert parsed["decode_tokens_per_s"] == pytest.approx(53.993251)
    assert (parsed["load_ms"], parsed["ttft_ms"], parsed["rss_mb"]) == (887, 56, None)


@pytest.mark.parametrize("text, error", [
    ("I 00:00:00.2 executorch:main.cpp:187] Failed to create llama runner\n", "Failed to create llama runner"),
    ("ERROR: unknown command line flag 'ignore_eos'\n", "ERROR: unknown command line flag 'ignore_eos'"),
    ("I 00:00:00.1 executorch:main.cpp:130] Resetting threadpool with num threads = 4\nSegmentation fault\n",
     "no PyTorchObserver line in its output"),
])
def test_a_runner_that_stopped_says_why(text, error):
    assert parse_llama_main(text)["error"] == error


def test_prompt_texts_encode_to_the_asked_length():
    from edgekd.models import BUILTIN_LLM, load_tokenizer

    tokenizer = load_tokenizer(BUILTIN_LLM)  # byte-level BPE: a decoded random sequence does not re-encode as is
    texts = prompt_texts(tokenizer, (16, 64), seed=3)
    assert {n: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for n, t in texts.items()} == {16: 16, 64: 64}
    assert prompt_texts(tokenizer, (16,), seed=3) == {16: texts[16]}  # seeded


# ------------------------------------------------------------------------------------------------ the wire

def decoder_export(folder: Path, role: str, quant: str, max_seq_len: int = 64, tokenizer=None) -> Path:
    tokenizer = tokenizer or tiny_tokenizer()
    with write_stage(folder, "export", {"target": "android", "format": "executorch-llm", "role": role}, {}) as stage:
        artifact = f"tiny-{role}_xnnpack_{quant}.pte"
        (stage.path / artifact).write_bytes(b"ET12 stand-in for a decoder .pte " + role.encode())
        tokenizer.backend_tokenizer.save(str(stage.path / "tokenizer.json"))
        stage.metrics = {}
        stage.extra.update(artifact=artifact, role=role, quant={"name": quant}, max_seq_len=max_seq_len)
    return folder


@pytest.fixture
def exports(tmp_path):
    llama_main = tmp_path / "llama_main"
    llama_main.write_bytes(b"\x7fELF llama_main for arm64-v8a")
    return (decoder_export(tmp_path / "export" / "teacher-fp32", "teacher", "fp32"),
            decoder_export(tmp_path / "export" / "student-fp32", "student", "fp32", max_seq_len=19), llama_main)


def bench(exports, out, *extra):
    teacher, student, llama_main = exports
    return main(["bench", str(teacher), str(student), "--device", "android", "--llama-main", str(llama_main),
                 "--prompt-tokens", "8,16", "--new-tokens", "5", "--rounds", "2", "--out", str(out), *extra])


def runner_calls(state: Path) -> list[str]:
    return [line for line in (state / "commands.log").read_text().splitlines() if "llama_main --model_path" in line]


def test_decoder_exports_are_measured_interleaved_with_llama_main(phone, exports, tmp_path, capsys):
    state = phone("ok")
    out = tmp_path / "bench-android"
    assert bench(exports, out, "--json") == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["schema"] == "edgekd.bench-llm/1" and result["complete"] is True
    assert result["finished"] == ["teacher-fp32", "student-fp32"]
    # 16 + 5 new tokens (the last never fed back) exceed the student's context of 19: skipped and said, not run.
    assert result["skipped"] == [{"name": "student-fp32", "prompt_tokens": 16,
                                  "reason": "16 prompt + 5 new tokens exceed its context of 19"}]
    calls = runner_calls(state)
    folders = [call.split("--model_path=/data/local/tmp/edgekd/")[1].split("/")[0] for call in calls]
    assert folders == ["teacher-fp32", "student-fp32", "teacher-fp32"] * 2  # per round: 8 tokens A B, 16 tokens A
    assert all("--temperature=0 --ignore_eos" in c and "--max_new_tokens=5" in c and "--warmup" in c for c in calls)
    teacher, student = result["results"]
    # The fake's run k (1-based, in call order): load 30 + k ms, prefill n / 2 + k ms, 4 decode tokens in 20 + k ms.
    assert teacher["by_prompt_tokens"]["8"]["ttft_ms"]["samples"] == [4 + 1, 4 + 4]
    assert teacher["by_prompt_tokens"]["16"]["decode_tokens_per_s"]["samples"] == [
        pytest.approx(4000 / 23), pytest.approx(4000 / 26)]
    assert student["decode_tokens_per_s"] == pytest.approx((4000 / 22 + 4000 / 25) / 2)
    assert teacher["ttft_ms"] == pytest.approx(6.5)  # the headline: the shortest length both measured
    assert teacher["load_ms"] == pytest.approx(33.5) and teacher["runs_done"] == teacher["runs_planned"] == 4
    assert teacher["peak_rss_mb"] == pytest.approx(96.25 + 6, abs=0.1)
    assert teacher["by_prompt_tokens"]["16"]["prompt_tokens_on_device"] == [16]
    (ratio,) = result["ratios"]
    assert (ratio["variant"], ratio["over"], ratio["kind"]) == ("student-fp32", "teacher-fp32", "student over teacher")
    assert ratio["decode_speedup"] == pytest.approx(student["decode_tokens_per_s"] / teacher["decode_tokens_per_s"],
                                                    abs=1e-3)
    # The wire: binary, prompts and each export's .pte and tokenizer.json in its own folder.
    pushed = {p.relative_to(state / "device").as_posix() for p in (state / "device").rglob("*") if p.is_file()}
    assert {"data/local/tmp/edgekd/llama_main", "data/local/tmp/edgekd/prompt-8.txt",
            "data/local/tmp/edgekd/student-fp32/tokenizer.json",
            "data/local/tmp/edgekd/teacher-fp32/tiny-teacher_xnnpack_fp32.pte"} <= pushed
    prompt = (state / "device/data/local/tmp/edgekd/prompt-16.txt").read_text()
    assert len(tiny_tokenizer()(prompt, add_special_tokens=False)["input_ids"]) == 16
    assert read_manifest(out)["machine"]["model"] == "Pixel 7"
    # A rerun finds the stage done; the plain output is one line per export.
    assert bench(exports, out) == 0
    assert len(runner_calls(state)) == 6 and "decode" in capsys.readouterr().out


def test_a_phone_that_goes_away_keeps_the_finished_runs(phone, exports, tmp_path, capsys):
    state = phone("disconnect", after=3)
    out = tmp_path / "bench-android"
    assert bench(exports, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disconnected" in err[0] and "complete: false" in err[0]
    metrics = read_manifest(out)["metrics"]
    assert metrics["complete"] is False and metrics["finished"] == []
    assert {r["name"]: r["runs_done"] for r in metrics["results"]} == {"teacher-fp32": 2, "student-fp32": 1}
    phone("ok")
    (state / "gone").unlink()
    assert bench(exports, out) == 0  # a partial stage is measured again
    assert read_manifest(out)["metrics"]["complete"] is True


def test_a_runner_that_fails_stops_that_export_in_one_line(phone, exports, tmp_path, capsys):
    phone("llm_crash")
    assert bench(exports, tmp_path / "bench-android") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama_main failed on teacher-fp32 (exit 1): Failed to run llama runner" in err[0]


def test_a_hung_runner_is_a_timeout(phone, exports, tmp_path, capsys):
    phone("hang")
    assert bench(exports, tmp_path / "bench-android", "--timeout", "2") == 1
    assert "did not answer within 2 s" in capsys.readouterr().err


def test_a_missing_llama_main_is_named_before_the_phone_is_touched(phone, exports, tmp_path, capsys):
    state = phone("ok")
    teacher, student, _ = exports
    assert main(["bench", str(teacher), "--device", "android", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--llama-main was not given" in err and "cmake" in err and len(err.splitlines()) == 1
    assert not (state / "commands.log").exists() and not (tmp_path / "b").exists()


def test_decoder_and_classifier_exports_are_not_mixed(exports, tmp_path, capsys):
    teacher, _, _ = exports
    with write_stage(tmp_path / "classifier", "export", {"target": "android", "format": "executorch"}, {}) as stage:
        stage.metrics = {}
    assert main(["bench", str(teacher), str(tmp_path / "classifier"), "--out", str(tmp_path / "b")]) == 1
    assert "bench each kind with its own edgekd bench command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ LiteRT-LM

def test_litert_lm_v070_benchmark_block_gives_its_turns_init_and_peak():
    parsed = parse_litert_lm_benchmark((FIXTURES / "litert_lm_main_v0.7.0_rendered.txt").read_text())
    assert parsed["error"] is None
    assert (parsed["prompt_tokens"], parsed["generated_tokens"]) == (128, 32)
    assert (parsed["prefill_tokens_per_s"], parsed["decode_tokens_per_s"]) == (310.30, 25.10)
    assert parsed["load_ms"] == 640.28 and parsed["rss_mb"] == 412.137  # "Total init time", "Peak system ram usage"
    # No "Time to first token" line before v0.8.0: the prefill plus one decode step, from the turns' durations
    assert parsed["ttft_ms"] == pytest.approx(412.5031 + 1275.1046 / 32)


@pytest.mark.parametrize("fixture, tokens, speeds, load_ms, printed_ttft_s, rss", [
    ("litert_lm_advanced_main_rendered.txt", (64, 32), (289.19, 27.07), 701.35, 0.26, 398.25),
    ("litert_lm_main_windows_v0.10.2_paste.txt", (16, 88), (19.51, 10.11), 580.10, 0.92, None)])
def test_litert_lm_later_benchmark_blocks(fixture, tokens, speeds, load_ms, printed_ttft_s, rss):
    parsed = parse_litert_lm_benchmark((FIXTURES / fixture).read_text())
    assert parsed["error"] is None and (parsed["prompt_tokens"], parsed["generated_tokens"]) == tokens
    assert (parsed["prefill_tokens_per_s"], parsed["decode_tokens_per_s"]) == speeds
    assert parsed["load_ms"] == load_ms and parsed["rss_mb"] == rss  # "- Init Total"; the peak, not the private
    assert parsed["ttft_ms"] == pytest.approx(printed_ttft_s * 1e3, abs=5)  # its own line, rounded to 10 ms


@pytest.mark.parametrize("text, error", [
    ((FIXTURES / "litert_lm_check_failed_issue319.txt").read_text(),
     "Check failed: MainHelper(argc, argv) is OK (INVALID_ARGUMENT: Model path is empty.)"),
    ((FIXTURES / "litert_lm_no_turns_issue1396.txt").read_text(),
     "its BenchmarkInfo recorded no prefill turn (the engine ran no inference)"),
    # v0.7.0 litert_lm_main.cc:173, ABSL_LOG(FATAL) behind abseil's prefix
    ("F0000 00:00:1750000000.200000    4242 litert_lm_main.cc:173] Async mode does not support benchmarking with "
     "specified number of prefill or decode tokens. If you want to benchmark the model, please try again with "
     "--async=false.\n", "Async mode does not support benchmarking with specified number of prefill or decode "
     "tokens. If you want to benchmark the model, please try again with --async=false."),
    ("Segmentation fault\n", "no BenchmarkInfo block with a prefill and a decode turn in its output"),
])
def test_a_litert_lm_run_that_stopped_says_why(text, error):
    assert parse_litert_lm_benchmark(text)["error"] == error


@pytest.mark.parametrize("flag, says", [("benchmark", "the plain litert_lm_main of LiteRT-LM v0.8.0 or later"),
                                        ("num_cpu_threads", "v0.7.0 or earlier sets no thread count")])
def test_a_litert_lm_binary_without_the_flags_names_the_one_to_give(flag, says):
    # abseil's ReportUsageError: "ERROR: " << "Unknown command line flag '" << name << "'"
    error = parse_litert_lm_benchmark(f"ERROR: Unknown command line flag '{flag}'\n")["error"]
    assert error.startswith(f"ERROR: Unknown command line flag '{flag}': ") and says in error


def test_the_parsed_fragments_are_those_the_litert_lm_wheel_prints():
    # The format strings compiled into the LiteRT-LM runtime installed here (litert-lm-api, the `litert` extra)
    litert_lm = pytest.importorskip("litert_lm")
    library = (Path(litert_lm.__file__).parent / "liblitert-lm.so").read_bytes()
    for fragment in ("BenchmarkInfo:", "  Prefill Turns (Total ", "  Decode Turns (Total ", "Processed ",
                     " duration.", " tokens/sec.", "  Time to first token: ", "Init Total",
                     "    No prefill turns recorded.", "Unknown command line flag '"):
        assert fragment.encode() in library, fragment


def litert_export(folder: Path, role: str, quant: str, max_seq_len: int = 64) -> Path:
    with write_stage(folder, "export", {"target": "android", "format": "litert-lm", "role": role}, {}) as stage:
        artifact = f"tiny-{role}_{quant}.litertlm"
        (stage.path / artifact).write_bytes(b"LITERTLM stand-in for a bundle " + role.encode())
        stage.metrics = {}
        stage.extra.update(artifact=artifact, role=role, quant={"name": quant}, max_seq_len=max_seq_len)
    return folder


@pytest.fixture
def mixed(tmp_path, exports):
    """The student as a .pte (context 19: 13 + 5 - 1 positions fit) and as a .litertlm, and both runners."""
    litert_lm_main = tmp_path / "litert_lm_advanced_main"
    litert_lm_main.write_bytes(b"\x7fELF litert_lm_advanced_main for arm64-v8a")
    return (exports[1], litert_export(tmp_path / "export" / "student-fp32-litert", "student", "fp32"), exports[2],
            litert_lm_main)


def bench_mixed(mixed, out, *extra, binaries=(True, True)):
    pte, bundle, llama_main, litert_lm_main = mixed
    given = [*(["--llama-main", str(llama_main)] if binaries[0] else []),
             *(["--litert-lm-main", str(litert_lm_main)] if binaries[1] else [])]
    return main(["bench", str(pte), str(bundle), "--device", "android", *given, "--prompt-tokens", "8,13",
                 "--new-tokens", "5", "--rounds", "2", "--out", str(out), *extra])


def litert_calls(state: Path) -> list[str]:
    return [line for line in (state / "commands.log").read_text().splitlines() if "_main --model_path" in line]


def test_a_pte_and_a_litertlm_are_measured_in_one_round_robin(phone, mixed, tmp_path, capsys):
    state = phone("ok")
    assert bench_mixed(mixed, tmp_path / "b", "--threads", "2", "--json") == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] is True and result["finished"] == ["student-fp32", "student-fp32-litert"]
    runners = [call.split(" --model_path")[0].rsplit("/", 1)[1] for call in litert_calls(state)]
    # one discarded warm-up run of the bundle, then per round and length: .pte, .litertlm
    assert runners == ["litert_lm_main"] + ["llama_main", "litert_lm_main"] * 4
    litert = [c for c in litert_calls(state) if "litert_lm_main --model_path" in c]
    assert all("--backend=cpu --benchmark --benchmark_prefill_tokens=" in c and "--benchmark_decode_tokens=5 "
               "--async=false --report_peak_memory_footprint --num_cpu_threads=2" in c for c in litert)
    assert [c.split("--benchmark_prefill_tokens=")[1].split(" ")[0] for c in litert] == ["8", "8", "13", "8", "13"]
    pte, bundle = result["results"]
    assert (bundle["runtime"], bundle["runner"], bundle["versions"]["runner"]) == (
        "litert-lm", "litert_lm_main", "litert_lm_advanced_main")
    assert (pte["runtime"], pte["runner"]) == ("executorch", "llama_main")
    # The fake's run k (all runners counted, the warm-up is k=1): prefill 2 ms a token + k, decode 20 ms one + k
    assert bundle["by_prompt_tokens"]["8"]["ttft_ms"]["samples"] == [pytest.approx(19 + 103 / 5),
                                                                      pytest.approx(23 + 107 / 5)]
    assert bundle["by_prompt_tokens"]["13"]["decode_tokens_per_s"]["samples"] == [
        pytest.approx(5000 / 105, abs=0.01), pytest.approx(5000 / 109, abs=0.01)]
    assert bundle["by_prompt_tokens"]["8"]["prompt_tokens_on_device"] == [8]
    assert bundle["load_ms"] == 606 and bundle["peak_rss_mb"] == 309.5 and bundle["runs_done"] == 4
    (ratio,) = result["ratios"]
    assert (ratio["variant"], ratio["over"], ratio["kind"]) == ("student-fp32-litert", "student-fp32",
                                                                "litert-lm over executorch")
    assert ratio["decode_speedup"] == pytest.approx(bundle["decode_tokens_per_s"] / pte["decode_tokens_per_s"],
                                                    abs=1e-3)
    assert "litert-lm" in result["prompts"]
    pushed = {p.relative_to(state / "device").as_posix() for p in (state / "device").rglob("*") if p.is_file()}
    assert {"data/local/tmp/edgekd/litert_lm_main", "data/local/tmp/edgekd/llama_main",
            "data/local/tmp/edgekd/student-fp32-litert/tiny-student_fp32.litertlm"} <= pushed
    assert "data/local/tmp/edgekd/student-fp32-litert/tokenizer.json" not in pushed


def test_each_runner_is_asked_for_only_when_its_exports_are_benched(phone, mixed, tmp_path, capsys):
    state = phone("ok")
    assert bench_mixed(mixed, tmp_path / "b", binaries=(True, False)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "litert_lm_main is needed for .litertlm exports" in err
    assert "--litert-lm-main was not given" in err and "litert_lm_advanced_main" in err
    assert not (state / "commands.log").exists() and not (tmp_path / "b").exists()
    pte, bundle, llama_main, litert_lm_main = mixed
    assert bench_mixed((pte, bundle, llama_main, tmp_path / "nowhere"), tmp_path / "b") == 1
    assert "--litert-lm-main " + str(tmp_path / "nowhere") + ": no such file" in capsys.readouterr().err
    # A bundle alone needs no llama_main (and no tokenizer.json)
    assert main(["bench", str(bundle), "--device", "android", "--litert-lm-main", str(litert_lm_main),
                 "--prompt-tokens", "8", "--new-tokens", "5", "--out", str(tmp_path / "b1")]) == 0
    assert "llama_main" not in (state / "commands.log").read_text()


def test_a_failing_litert_lm_stops_the_bundle_and_keeps_the_pte(phone, mixed, tmp_path, capsys):
    phone("litert_crash")
    assert bench_mixed(mixed, tmp_path / "b") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "litert_lm_main failed on student-fp32-litert (exit 134): Check failed: MainHelper" \
        "(argc, argv) is OK (INTERNAL: fake adb: the prefill failed)" in err[0]
    metrics = read_manifest(tmp_path / "b")["metrics"]
    assert metrics["complete"] is False and metrics["finished"] == ["student-fp32"]
    assert [r["name"] for r in metrics["results"]] == ["student-fp32"] and metrics["results"][0]["runs_done"] == 4


@pytest.mark.parametrize("mode, extra, says", [
    ("litert_plain", (), "the plain litert_lm_main of LiteRT-LM v0.8.0 or later, which has no benchmark flags"),
    ("litert_v07", ("--threads", "2"), "v0.7.0 or earlier sets no thread count")])
def test_a_litert_lm_binary_without_the_benchmark_flags_is_named(phone, mixed, tmp_path, capsys, mode, extra, says):
    phone(mode)
    assert bench_mixed(mixed, tmp_path / "b", "--warmup", "0", *extra) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "litert_lm_main failed on student-fp32-litert (exit 1)" in err
    assert says in err


def test_a_phone_that_goes_away_mid_round_keeps_both_runtimes_runs(phone, mixed, tmp_path, capsys):
    state = phone("disconnect", after=3)  # the warm-up, then .pte and .litertlm once: the 4th run finds it gone
    assert bench_mixed(mixed, tmp_path / "b") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disconnected" in err[0] and "complete: false" in err[0]
    metrics = read_manifest(tmp_path / "b")["metrics"]
    assert metrics["complete"] is False and metrics["finished"] == []
    assert {r["name"]: r["runs_done"] for r in metrics["results"]} == {"student-fp32": 1, "student-fp32-litert": 1}
    phone("ok")
    (state / "gone").unlink()
    assert bench_mixed(mixed, tmp_path / "b") == 0 and read_manifest(tmp_path / "b")["metrics"]["complete"] is True


# ------------------------------------------------------------------------------------------------ iOS

# XCTest's lines for the Benchmark app's LLM test (rendered from Tests/LLM/LLMTests.mm: its metric's displayName
# "Tokens Per Second" and unitSymbol "t/s", in XCTest's "measured [NAME, UNIT]" format of
# tests/fixtures/bench/xcodebuild_specificationkit.txt); test names as ResourceTestCase.m builds them.
FAKE_XCODEBUILD = r'''import sys
models, mode = {models!r}, {mode!r}
if mode == "hang":
    import time; time.sleep(60)
for i, model in enumerate(models):
    name = f"test_generate_{{model}}_tokenizer_json_iOS_18_1_iPhone15_4"
    for metric, values in (("Tokens Per Second, t/s", [40.0 + 10 * i + k for k in range(5)]),
                           ("Clock Monotonic Time, s", [1.2 - 0.1 * i + 0.01 * k for k in range(5)]),
                           ("Memory Peak Physical, kB", [409600.0 + 1024 * i] * 5)):
        avg = sum(values) / len(values)
        print(f"<unknown>:0: Test Case '-[LLMTests {{name}}]' measured [{{metric}}] average: {{avg:.3f}}, relative "
              f"standard deviation: 1.000%, values: [{{', '.join(f'{{v:.6f}}' for v in values)}}], "
              f"performanceMetricID:TokensPerSecondMetric, baselineName: \"\", baselineAverage: , polarity: unknown")
    print(f"Test Case '-[LLMTests {{name}}]' passed (7.500 seconds).")
print("** TEST EXECUTE SUCCEEDED **")
'''
UDID = "00008120-001A2B3C4D5E6F70"


def xcodebuild(tmp_path, monkeypatch, models, mode="ok"):
    from edgekd.benchmarks import ios

    folder = tmp_path / "xcode"
    folder.mkdir()
    (folder / "fake.py").write_text(FAKE_XCODEBUILD.format(models=models, mode=mode))
    (folder / "xcodebuild").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{folder / "fake.py"}" "$@"\n')
    (folder / "xcodebuild").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(ios, "PLATFORM", "darwin")
    (tmp_path / "Benchmark.xctestrun").write_text("<plist/>")
    return tmp_path / "Benchmark.xctestrun"


def ios_bench(exports, xctestrun, out, *extra):
    teacher, student, _ = exports
    return main(["bench", str(teacher), str(student), "--device", f"ios:{UDID}", "--xctestrun", str(xctestrun),
                 "--out", str(out), *extra])


def test_decoder_exports_on_an_iphone_through_the_benchmark_apps_llm_tests(exports, tmp_path, monkeypatch, capsys):
    # ResourceTestCase.m: the file name with punctuation as '_' (teacher-fp32_llm.pte -> teacher_fp32_llm_pte)
    xctestrun = xcodebuild(tmp_path, monkeypatch, ["teacher_fp32_llm_pte", "student_fp32_llm_pte"])
    out = tmp_path / "bench-ios"
    assert ios_bench(exports, xctestrun, out, "--json") == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] is True and result["prompts"]["prompt"] == "Once upon a time"
    teacher, student = result["results"]
    assert teacher["generate_tokens_per_s"] == 42.0 and student["generate_tokens_per_s"] == 52.0  # the medians
    assert teacher["generate_ms"]["p50"] == pytest.approx(1220.0) and teacher["peak_rss_mb"] == 400.0
    assert teacher["test"] == "test_generate_teacher_fp32_llm_pte_tokenizer_json_iOS_18_1_iPhone15_4"
    (ratio,) = result["ratios"]
    assert ratio["generate_speedup"] == pytest.approx(52 / 42, abs=1e-3) and ratio["decode_speedup"] is None


def test_an_iphone_run_missing_an_export_keeps_the_other_and_says_how_to_build(exports, tmp_path, monkeypatch,
                                                                               capsys):
    xctestrun = xcodebuild(tmp_path, monkeypatch, ["teacher_fp32_llm_pte"])
    out = tmp_path / "bench-ios"
    assert ios_bench(exports, xctestrun, out) == 1
    err = capsys.readouterr().err.strip()
    assert "no generate measurement for student-fp32" in err and "<export folder name>_llm.pte" in err
    metrics = read_manifest(out)["metrics"]
    assert metrics["complete"] is False and metrics["finished"] == ["teacher-fp32"]


def test_an_iphone_that_hangs_is_a_timeout_and_other_tokenizers_are_refused(exports, tmp_path, monkeypatch, capsys):
    xctestrun = xcodebuild(tmp_path, monkeypatch, ["teacher_fp32_llm_pte"], mode="hang")
    assert ios_bench(exports, xctestrun, tmp_path / "b", "--timeout", "2") == 1
    assert "xcodebuild did not finish within 2 s" in capsys.readouterr().err
    other = tiny_tokenizer()
    other.add_tokens(["quarterly"])
    teacher, _, llama_main = exports
    student = decoder_export(tmp_path / "export" / "other-student", "student", "fp32", tokenizer=other)
    assert ios_bench((teacher, student, llama_main), xctestrun, tmp_path / "b2") == 1
    assert "pairs every model in Resources with every tokenizer there" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()
