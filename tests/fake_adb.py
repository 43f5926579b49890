"""A fake `adb` for the wire tests of `edgekd bench --device android`: a phone that answers like the real
tools (formats as in tests/fixtures/bench/README.md) without running any model.

Installed as `adb` first on PATH by tests/test_bench_android.py. Its state lives in $FAKE_ADB_STATE:
config.json ({"mode": ..., "serial": ..., "after": N}), the pushed files under device/, the logcat
buffer, and commands.log (one line per call, for the tests to read). Modes:

    ok            one phone attached, every tool succeeds
    none          no device attached                 several       two phones attached
    unauthorized  the phone did not accept the host  disconnect    the phone vanishes as runner call `after` + 1 starts
    crash         executor_runner aborts             hang          executor_runner never returns
    fallback      benchmark_model runs without the XNNPACK delegate
    llm_crash     llama_main fails to generate       (crash / hang / disconnect apply to llama_main too)
    litert_crash  litert_lm_main aborts on a failed check (hang / disconnect apply to it too)
    litert_plain  litert_lm_main is LiteRT-LM's plain demo of v0.8.0 on: no benchmark flags
    litert_v07    litert_lm_main is v0.7.0's: benchmark flags, no --num_cpu_threads
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_ADB_STATE"])
CONFIG = json.loads((STATE / "config.json").read_text())
SERIAL = CONFIG.get("serial", "emulator-5554")
MODE = CONFIG.get("mode", "ok")
DEVICE = STATE / "device"


def out(text: str = "", err: str = "", code: int = 0):
    sys.stdout.write(text)
    sys.stderr.write(err)
    sys.exit(code)


def runs_so_far() -> int:
    counter = STATE / "runs"
    return int(counter.read_text()) if counter.exists() else 0


def count_run() -> int:
    if MODE == "disconnect" and runs_so_far() >= CONFIG["after"]:  # the phone goes away as this run starts
        (STATE / "gone").write_text("")
        out(err=f"adb: device '{SERIAL}' not found\n", code=1)
    n = runs_so_far() + 1
    (STATE / "runs").write_text(str(n))
    return n


def iteration_ms(run: int, i: int) -> float:
    """Deterministic per-iteration times, so a test can check what the harness parsed."""
    return 2.0 + run * 0.1 + i * 0.001


def executor_runner(args: dict) -> None:
    model = DEVICE / args["--model_path"].lstrip("/")
    if not (DEVICE / "data/local/tmp/edgekd/executor_runner").is_file() or not model.is_file():
        out(err=f"/system/bin/sh: {args['--model_path']}: inaccessible or not found\n", code=127)
    for path in args.get("--inputs", "").split(","):
        if not (DEVICE / path.lstrip("/")).is_file():
            out(err="", code=1)
    run = count_run()
    if MODE == "hang":
        time.sleep(60)
    n = int(args["--num_executions"])
    threads = int(args.get("--cpu_threads", "-1"))
    lines = [f"Resetting threadpool with num threads = {threads if threads > 0 else 4}",
             f"Model file {args['--model_path']} is loaded.", "Using method forward",
             "Setting up CPU planned buffer 0, size 331776.", f"Model loaded in {15 + run:f} ms."]
    if MODE == "crash":
        lines.append("Execution of method forward failed with status 0x12")
        append_logcat(lines, level="E")
        out(err="Aborted \n", code=134)
    times = [iteration_ms(run, i) for i in range(n)]
    lines += [f"Iteration {i + 1} of {n}: {t:f} ms" for i, t in enumerate(times)]
    lines += [f"Model executed successfully {n} time(s) in {sum(times):f} ms.", "1 outputs: "]
    append_logcat(lines)
    out("OutputX 0: tensor(sizes=[1, 3], [-1.23306, 0.0713825, 1.18466])\n")


def append_logcat(messages: list[str], level: str = "I") -> None:
    with open(STATE / "logcat", "a") as handle:
        for k, message in enumerate(messages):
            handle.write(f"11-29 10:41:07.{100 + k:03d} 21034 21034 {level} ExecuTorch: {message}\n")


def benchmark_model(args: dict) -> None:
    if not (DEVICE / args["--graph"].lstrip("/")).is_file():
        out(err=f"Failed to mmap model {args['--graph']}\n", code=1)
    run = count_run()
    n, warm = int(args["--num_runs"]), int(args["--warmup_runs"])
    avg = 1800 + run * 10
    delegate = "" if MODE == "fallback" else \
        "INFO: Replacing 131 out of 137 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 4 partitions " \
        "for the whole graph.\n"
    out("INFO: STARTING!\nINFO: Log parameter values verbosely: [0]\n"
        f"INFO: Min num runs: [{n}]\nINFO: Num threads: [{args['--num_threads']}]\n"
        f"INFO: Graph: [{args['--graph']}]\nINFO: #threads used for CPU inference: [{args['--num_threads']}]\n"
        f"INFO: Loaded model {args['--graph']}\nINFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n{delegate}"
        "INFO: The input model file size (MB): 0.937\nINFO: Initialized session in 4.101ms.\n"
        "INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding "
        "150 seconds.\n"
        f"INFO: count={warm} first=2400 curr=1900 min=1850 max=2400 avg=1990.5 std=120\n\n"
        f"INFO: Running benchmark for at least {n} iterations and at least 1 seconds but terminate if exceeding "
        "150 seconds.\n"
        f"INFO: count={n} first=1850 curr={avg} min=1700 max=2100 avg={avg} std=40\n\n"
        f"INFO: Inference timings in us: Init: 4101, First inference: 2400, Warmup (avg): 1990.5, Inference (avg): "
        f"{avg}\nINFO: Note: as the benchmark tool itself affects memory footprint, the following is only "
        "APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your "
        "discretion.\nINFO: Peak memory footprint (MB): init=3.25 overall=9.5\n")


def llama_main(args: dict, flags: list[str]) -> None:
    """ExecuTorch's llama_main: the generated text and one PyTorchObserver line on stdout, the runner's log on
    stderr (formats of tests/fixtures/bench/text_llm_runner_wheel.txt). Times in whole ms, deterministic per run:
    load 30 + run, prefill prompt_tokens / 2 + run, decode 5 ms a token + run."""
    model = DEVICE / args["--model_path"].lstrip("/")
    prompt = DEVICE / args["--prompt_file"].lstrip("/")
    if not (DEVICE / "data/local/tmp/edgekd/llama_main").is_file():
        out(err="/system/bin/sh: /data/local/tmp/edgekd/llama_main: inaccessible or not found\n", code=127)
    if not model.is_file() or not (DEVICE / args["--tokenizer_path"].lstrip("/")).is_file():
        out(err="[llm_runner_helper.cpp:49] Failed to load tokenizer\n"
                "E 00:00:00.001 executorch:main.cpp:187] Failed to create llama runner\n", code=1)
    if not prompt.is_file():
        out(err=f"Failed to read prompt file at path: {args['--prompt_file']}\n", code=1)
    run = count_run()
    if MODE == "hang":
        time.sleep(60)
    if MODE == "llm_crash" or MODE == "crash":
        out(err="[text_llm_runner.cpp:89] RSS after loading model: 80.5 MiB (0 if unsupported)\n"
                "E 00:00:00.200 executorch:main.cpp:222] Failed to run llama runner\n", code=1)
    n = int(prompt.name.split("-")[1].split(".")[0])  # prompt-N.txt holds an N-token text
    new = int(args["--max_new_tokens"]) - 1  # the prefill gives the first token
    t0 = 1796236729031 + 10_000 * run
    load_end = t0 + 30 + run
    prompt_end = load_end + n // 2 + run
    end = prompt_end + 5 * new + run
    stats = {"prefill_token_per_sec": round(n * 1000 / (prompt_end - load_end), 3),
             "decode_token_per_sec": round(new * 1000 / (end - prompt_end), 3), "prompt_tokens": n,
             "generated_tokens": new, "model_load_start_ms": t0, "model_load_end_ms": load_end,
             "inference_start_ms": load_end, "inference_end_ms": end, "model_execution_start_ms": end - 4,
             "model_execution_end_ms": end, "prompt_eval_end_ms": prompt_end, "first_token_ms": prompt_end,
             "aggregate_sampling_time_ms": 0, "aggregate_model_execution_time_ms": end - load_end - 2,
             "SCALING_FACTOR_UNITS_PER_SECOND": 1000}
    log = ("[llm_runner_helper.cpp:55] Loaded json tokenizer\n"
           + ("[llm_runner_helper.cpp:?] Doing a warmup run...\n" if "--warmup" in flags else "")
           + f"[text_llm_runner.cpp:89] RSS after loading model: {80.5 + run:f} MiB (0 if unsupported)\n"
           f"[text_llm_runner.cpp:258] RSS after finishing text generation: {96.25 + run:f} MiB (0 if unsupported)\n"
           f"[stats.h:175] \tPrompt Tokens: {n}    Generated Tokens: {new}\n")
    out(" the company said profit rose\nPyTorchObserver " + json.dumps(stats, separators=(",", ":")) + "\n", log)


# Flags of LiteRT-LM's binaries (google-ai-edge/LiteRT-LM runtime/engine/): litert_lm_advanced_main with
# shared_flags.cc (the few read here), litert_lm_main up to v0.7.0, and the plain litert_lm_main from v0.8.0 on.
LITERT_FLAGS = {"model_path", "backend", "benchmark", "benchmark_prefill_tokens", "benchmark_decode_tokens", "async",
                "report_peak_memory_footprint", "num_cpu_threads"}
LITERT_FLAGS_BY_MODE = {"litert_plain": {"model_path", "backend", "input_prompt", "input_prompt_file"},
                        "litert_v07": LITERT_FLAGS - {"num_cpu_threads"}}


def absl_duration(ms: float) -> str:
    """absl::FormatDuration as BenchmarkTurnData prints it ("221.30871ms", "1.1822003s")."""
    return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms:g}ms"


def litert_lm_main(words: list[str]) -> None:
    """LiteRT-LM's benchmark binary: abseil's log lines on stderr and BenchmarkInfo in the format of
    tests/fixtures/bench/litert_lm_advanced_main_rendered.txt. Times deterministic per run k (1-based, counted with
    the other runners): init 600 + k ms, prefill 2 ms a token + k, decode 20 ms a token + k."""
    flags = dict((w[2:].split("=", 1) + ["true"])[:2] for w in words[1:])
    unknown = [name for name in flags if name not in LITERT_FLAGS_BY_MODE.get(MODE, LITERT_FLAGS)]
    if unknown:  # abseil's flag parser reports each, then exits 1 (flags/parse.cc)
        out(err="".join(f"ERROR: Unknown command line flag '{name}'\n" for name in unknown), code=1)
    log = "I0000 00:00:{:.6f}    5151 litert_lm_lib.cc:{}] {}\n".format
    epoch = 1773100000.0 + 100 * runs_so_far()
    if not (DEVICE / flags["model_path"].lstrip("/")).is_file():
        out(err=f"F0000 00:00:{epoch:.6f}    5151 litert_lm_advanced_main.cc:245] Check failed: MainHelper(argc, "
                f"argv) is OK (NOT_FOUND: {flags['model_path']} (fake adb: no such file)) \n", code=134)
    run = count_run()
    if MODE == "hang":
        time.sleep(60)
    head = log(epoch, 96, f"Model path: {flags['model_path']}") + log(epoch, 127, f"Choose backend: {flags['backend']}")
    if MODE == "litert_crash":
        out(err=head + f"F0000 00:00:{epoch + 1:.6f}    5151 litert_lm_advanced_main.cc:245] Check failed: "
                       "MainHelper(argc, argv) is OK (INTERNAL: fake adb: the prefill failed) \n"
                       "*** Check failure stack trace: ***\nAborted \n", code=134)
    n, m = int(flags["benchmark_prefill_tokens"]), int(flags["benchmark_decode_tokens"])
    init, prefill, decode = 600 + run, 2 * n + run, 20 * m + run
    info = (f"BenchmarkInfo:\n  Init Phases (3):\n    - Init Executor: {init - 40:.2f} ms\n"
            f"    - Init Tokenizer: 40.00 ms\n    - Init Total: {init:.2f} ms\n{'-' * 50}\n"
            f"  Time to first token: {(prefill + decode / m) / 1000:.2f} s\n{'-' * 50}\n"
            f"  Prefill Turns (Total 1 turns):\n    Prefill Turn 1: Processed {n} tokens in "
            f"{absl_duration(prefill)} duration.\n      Prefill Speed: {n * 1000 / prefill:.2f} tokens/sec.\n"
            f"{'-' * 50}\n  Decode Turns (Total 1 turns):\n    Decode Turn 1: Processed {m} tokens in "
            f"{absl_duration(decode)} duration.\n      Decode Speed: {m * 1000 / decode:.2f} tokens/sec.\n"
            f"{'-' * 50}\n  TextToTokenIds Turns (Total 0 turns):\n    No text to token ids turns recorded.\n"
            f"{'-' * 50}\n{'-' * 50}\n")
    peak = log(epoch + 2, 623, f"Peak system ram usage: {300.5 + run:g}MB.")
    out(err=head + log(epoch, 661, "Creating engine") + log(epoch + 2, 595, info.rstrip("\n")) + peak)


def minibench_start(extras: dict) -> None:
    model_dir = DEVICE / extras["model_dir"].lstrip("/")
    models = sorted(p.name for p in model_dir.glob("*.pte"))
    run = count_run()
    name = models[0][:-4] if models else "none"
    rows = [("avg_inference_latency(ms)", 2.0 + run * 0.1), ("trimmean_inference_latency(ms)", 1.9 + run * 0.1),
            ("model_load_time(ms)", 20.0 + run), ("load_status", 0.0), ("ram_pss_usage(mb)", 14.5)]
    results = [{"benchmarkModel": {"name": name, "backend": "", "quantization": ""}, "metric": metric,
                "actualValue": value, "targetValue": 0.0,
                "deviceInfo": {"device": "google", "arch": "Pixel 7", "os": "Android 14", "totalMem": 0,
                               "availMem": 0}} for metric, value in rows]
    (STATE / "minibench.json").write_text(json.dumps(results, separators=(",", ":")))
    out("Starting: Intent { cmp=org.pytorch.minibench/.BenchmarkActivity (has extras) }\nStatus: ok\n"
        "LaunchState: COLD\nActivity: org.pytorch.minibench/.BenchmarkActivity\nTotalTime: 412\nWaitTime: 415\n"
        "Complete\n")


def shell(command: str) -> None:
    words = shlex.split(command)
    if words[0] == "getprop":
        props = {"ro.product.model": "Pixel 7", "ro.product.manufacturer": "Google", "ro.build.version.release": "14",
                 "ro.product.cpu.abi": "arm64-v8a", "ro.soc.model": "GS201"}
        out(props.get(words[1], "") + "\n")
    if words[0] == "cat" and "scaling_cur_freq" in command:
        out("1803000\n1803000\n1803000\n1803000\n2348000\n2348000\n2850000\n2850000\n")
    if words[0] in ("mkdir", "chmod", "rm"):
        if words[0] == "rm" and "&&" in words:  # rm -rf DIR && mkdir -p DIR
            shutil.rmtree(DEVICE / words[2].lstrip("/"), ignore_errors=True)
            (DEVICE / words[-1].lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif words[0] == "mkdir":
            (DEVICE / words[-1].lstrip("/")).mkdir(parents=True, exist_ok=True)
        out()
    if words[0] == "pm":
        out("package:/data/app/~~x==/org.pytorch.minibench-y==/base.apk\n")
    if words[0] == "am":
        (STATE / "am_start").write_text(command)
        minibench_start({words[i + 1]: words[i + 2] for i, w in enumerate(words) if w in ("--es", "--ei")})
    if words[0] == "run-as":
        if words[2] == "rm":
            (STATE / "minibench.json").unlink(missing_ok=True)
            out()
        result = STATE / "minibench.json"
        out(result.read_text() if result.exists() else "",
            "" if result.exists() else "cat: files/benchmark_results.json: No such file or directory\n",
            0 if result.exists() else 1)
    binary = Path(words[0]).name
    args = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    if binary == "executor_runner":
        executor_runner(args)
    if binary == "benchmark_model":
        benchmark_model(args)
    if binary == "llama_main":
        llama_main(args, words[1:])
    if binary == "litert_lm_main":
        litert_lm_main(words)
    out(err=f"/system/bin/sh: {words[0]}: not found\n", code=127)


def main(argv: list[str]) -> None:
    with open(STATE / "commands.log", "a") as log:
        log.write(" ".join(argv) + "\n")
    serial = None
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
    if argv == ["devices"]:
        listed = {"none": "", "several": f"{SERIAL}\tdevice\nR58M0002\tdevice\n",
                  "unauthorized": f"{SERIAL}\tunauthorized\n"}.get(MODE, f"{SERIAL}\tdevice\n")
        out(f"List of devices attached\n{listed}\n")
    if serial not in (None, SERIAL) or MODE == "none":
        out(err=f"adb: device '{serial}' not found\n" if serial else "adb: no devices/emulators found\n", code=1)
    if (STATE / "gone").exists():
        out(err=f"adb: device '{SERIAL}' not found\n", code=1)
    if argv[0] == "push":
        target = DEVICE / argv[2].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(argv[1], target)
        size = Path(argv[1]).stat().st_size
        out(f"{argv[1]}: 1 file pushed, 0 skipped. 37.3 MB/s ({size} bytes in 0.001s)\n")
    if argv[:2] == ["logcat", "-c"]:
        (STATE / "logcat").write_text("")
        out()
    if argv[0] == "logcat":
        log = STATE / "logcat"
        out("--------- beginning of main\n" + (log.read_text() if log.exists() else ""))
    if argv[0] == "shell":
        shell(" ".join(argv[1:]))
    out(err=f"adb: unknown command {argv[0]}\n", code=1)


if __name__ == "__main__":
    main(sys.argv[1:])
