"""LiteRT-LM bundles (.litertlm) on an Android phone: LiteRT-LM's own benchmark binary over adb.

    edgekd bench EXPORT... --device android[:SERIAL] --litert-lm-main PATH [--llama-main PATH] --out DIR

Which binary (google-ai-edge/LiteRT-LM, runtime/engine/): the benchmark flags --benchmark,
--benchmark_prefill_tokens, --benchmark_decode_tokens, --async and --report_peak_memory_footprint are
`litert_lm_main`'s up to v0.7.0 (litert_lm_main.cc at 56a2c21c); from v0.8.0 on (commit 2fbb5ec5, 2025-10-20)
they are `litert_lm_advanced_main`'s (litert_lm_advanced_main.cc, shared_flags.cc), which adds --num_cpu_threads,
and `litert_lm_main` became a plain demo that takes a prompt and nothing else. --litert-lm-main takes either
benchmark binary; the plain one is refused by its own flag parser, and the error says which binary to give.

Each run: --backend=cpu (the .pte runs on XNNPACK's CPU kernels too), --benchmark with the asked prompt length and
new tokens as token counts (the runtime makes its own prompt of that many tokens: no text, no tokenizer.json),
--async=false (v0.7.0 aborts on token counts in async mode), --report_peak_memory_footprint, and --num_cpu_threads
only with --threads (v0.7.0 has no such flag). The binary logs BenchmarkInfo's operator<< (io_types.cc) with
ABSL_LOG(INFO), so on stderr behind abseil's "I0000 00:00:... file.cc:N] " prefix; `parse_litert_lm_benchmark`
reads the block of every version seen (tests/fixtures/bench/README.md).
"""
from __future__ import annotations

import re
import shlex

from edgekd.benchmarks.android import DEVICE_DIR, Adb, _tail
from edgekd.benchmarks.llm import FIGURES

GET_LITERT_LM_MAIN = (
    "give LiteRT-LM's benchmark binary for Android arm64: litert_lm_advanced_main of v0.8.0 or later (bazel build "
    "--config=android_arm64 //runtime/engine:litert_lm_advanced_main in a LiteRT-LM checkout at a release tag, "
    "ANDROID_NDK_HOME set to NDK r28b or newer), or litert_lm_main of v0.7.0 or earlier (also prebuilt on its "
    "GitHub releases page as litert_lm_main.android_arm64); the litert_lm_main of v0.8.0 on has no benchmark flags")

_BLOCK = "BenchmarkInfo:"
# "    Prefill Turn 1: Processed 64 tokens in 221.30871ms duration." (BenchmarkTurnData's operator<<)
_TURN = re.compile(r"(Prefill|Decode) Turn 1: Processed (\d+) tokens in (\S+) duration\.")
_SPEED = re.compile(r"(Prefill|Decode) Speed: ([0-9.]+) tokens/sec\.")
_INIT = re.compile(r"(?:- Init Total|Total init time): ([0-9.]+) ms")  # v0.8.0 on: a phase; before: the sum
_TTFT = re.compile(r"Time to first token: ([0-9.]+) s")
_PEAK = re.compile(r"Peak system ram usage: ([0-9.]+(?:e[+-]?\d+)?) ?MB")
_DURATION = re.compile(r"([0-9.]+)(ns|us|ms|h|m|s)")  # absl::FormatDuration: "1.1822003s", "1m2.5s", "11.2us"
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
# abseil's flag parser (flags/parse.cc, usage_config.cc) before it exits 1
_UNKNOWN_FLAG = re.compile(r"ERROR: Unknown command line flag '(\w+)'")
_CHECK_FAILED = re.compile(r"(Check failed: [^\n]*?)\s*$", re.M)  # ABSL_CHECK_OK(MainHelper(...)) and the like
_ABSL_FATAL = re.compile(r"^[FE]\d{4} [0-9:.]+\s+\d+ \S+:\d+\] ([^\n]+)$", re.M)


def parse_litert_lm_benchmark(text: str) -> dict:
    """litert_lm_main's (or litert_lm_advanced_main's) output in benchmark mode -> {prompt_tokens,
    generated_tokens, load_ms, ttft_ms, prefill_tokens_per_s, decode_tokens_per_s, rss_mb, error}.

    From the last BenchmarkInfo block: the turns' token counts, the runtime's own prefill and decode speeds (tokens
    of the turn over its duration), load as its total init time, and time to first token as its own
    GetTimeToFirstToken defines it (v0.8.0 on: the prefill plus one decode step), computed from the turns'
    durations, which every version prints in full (v0.7.0 prints no such line, later ones round it to 10 ms).
    RSS: the "Peak system ram usage" line of --report_peak_memory_footprint (MB as the runtime counts them; 0
    where it cannot read it). Without a prefill and a decode turn, `error` says why in one line."""
    result = dict.fromkeys(("prompt_tokens", "generated_tokens", "load_ms", "rss_mb", *FIGURES))
    result["error"] = None
    block = text[text.rfind(_BLOCK):] if _BLOCK in text else ""  # the last: --num_iterations prints one each
    turns = {kind: (int(n), _seconds(d)) for kind, n, d in _TURN.findall(block)}
    if not {"Prefill", "Decode"} <= set(turns):
        result["error"] = _why(text, block)
        return result
    speeds = {}
    for kind, value in _SPEED.findall(block):
        speeds.setdefault(kind, float(value) or None)  # 0.00: a turn of no duration
    (n, prefill_s), (m, decode_s) = turns["Prefill"], turns["Decode"]
    result.update(prompt_tokens=n, generated_tokens=m, prefill_tokens_per_s=speeds.get("Prefill"),
                  decode_tokens_per_s=speeds.get("Decode"))
    ttft = _TTFT.search(block)
    if prefill_s is not None and decode_s is not None and m:
        result["ttft_ms"] = (prefill_s + decode_s / m) * 1e3
    elif ttft and float(ttft.group(1)) > 0:
        result["ttft_ms"] = float(ttft.group(1)) * 1e3
    init = _INIT.search(block)
    result["load_ms"] = float(init.group(1)) if init else None
    peaks = [float(v) for v in _PEAK.findall(text) if float(v) > 0]
    result["rss_mb"] = max(peaks) if peaks else None
    return result


def _seconds(duration: str) -> float | None:
    parts = _DURATION.findall(duration)
    return sum(float(value) * _SECONDS[unit] for value, unit in parts) if parts else None


def _why(text: str, block: str) -> str:
    flag = _UNKNOWN_FLAG.search(text)
    if flag and flag.group(1) == "num_cpu_threads":
        return (f"{flag.group(0)}: a litert_lm_main of LiteRT-LM v0.7.0 or earlier sets no thread count; run "
                f"without --threads, or give --litert-lm-main a litert_lm_advanced_main of v0.8.0 or later")
    if flag:
        return (f"{flag.group(0)}: this is the plain litert_lm_main of LiteRT-LM v0.8.0 or later, which has no "
                f"benchmark flags; give --litert-lm-main the litert_lm_advanced_main of the same release")
    failed = _CHECK_FAILED.search(text) or _ABSL_FATAL.search(text)
    if failed:
        return failed.group(1).strip()
    if "No prefill turns recorded." in block:
        return "its BenchmarkInfo recorded no prefill turn (the engine ran no inference)"
    return "no BenchmarkInfo block with a prefill and a decode turn in its output"


def run_litert_lm(adb: Adb, art, prompt_tokens: int, new_tokens: int, settings) -> dict:
    """One benchmark run of `art` (a .litertlm export) by the binary pushed as DEVICE_DIR/litert_lm_main."""
    command = (f"{DEVICE_DIR}/litert_lm_main --model_path={DEVICE_DIR}/{art.name}/{shlex.quote(art.file.name)} "
               f"--backend=cpu --benchmark --benchmark_prefill_tokens={prompt_tokens} "
               f"--benchmark_decode_tokens={new_tokens} --async=false --report_peak_memory_footprint"
               + (f" --num_cpu_threads={settings.threads}" if settings.threads else ""))
    proc = adb.shell(command)
    parsed = parse_litert_lm_benchmark(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or parsed["error"]:
        return {**parsed, "error": f"litert_lm_main failed on {art.name} (exit {proc.returncode}): "
                                   f"{parsed['error'] or _tail(proc)}"}
    return {**parsed, "asked_prompt_tokens": prompt_tokens}
