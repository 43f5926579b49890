"""Decoder LMs on an Android phone: ExecuTorch's LLM runner `llama_main` over adb.

    edgekd bench EXPORT... --device android[:SERIAL] --llama-main PATH [--prompt-tokens 64,128] --out DIR

`llama_main` (examples/models/llama/main.cpp of an ExecuTorch checkout, built for Android) is pushed to
/data/local/tmp/edgekd with each .pte and the tokenizer.json beside it. For each round and prompt length, every
artifact runs once in turn (A B A B ..., as the host bench): greedy (--temperature 0), eos ignored, `new_tokens`
tokens, a warm-up generation first (--warmup), the prompt text from a pushed file. The runner's TextLLMRunner prints
one `PyTorchObserver {json}` line per generation (extension/llm/runner/stats.h, `print_report`): its millisecond
timestamps give load time, time to first token, prefill and decode tokens/s by stats.h's own definitions (decode:
the tokens after the prefill's first over the time after it); its "RSS after finishing text generation" line, where
the build logs it, the resident memory. Prompts are seeded token ids decoded to text and re-encoded until their
length holds (`prompt_texts`); the phone's tokenizer count is recorded beside the asked length.

A device fault (phone gone, runner hung) keeps the runs finished so far, with `complete: false`; a runner that
fails on one artifact stops that artifact only. Nothing here has run on a phone: the parser is tested on the
runner's output (a user's paste, and the same C++ runner in the executorch wheel here), the wire on a fake adb.
"""
from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

from edgekd.benchmarks.android import DEVICE_DIR, Adb, _sha256, _tail
from edgekd.benchmarks.devices import DeviceFault
from edgekd.benchmarks.llm import FIGURES, SCHEMA, headline
from edgekd.benchmarks.stats import latency_stats
from edgekd.errors import BenchError

BUILD_LLAMA_MAIN = (
    "build it from an ExecuTorch checkout with the Android NDK, as its examples/models/llama/README.md shows (step 4, "
    "'Run benchmark on Android phone': ExecuTorch with -DEXECUTORCH_BUILD_EXTENSION_LLM_RUNNER=ON and the XNNPACK, "
    "quantized and LLM kernels, installed to cmake-out-android, then the examples/models/llama project; the full "
    "commands are in edgekd's README, Benchmarks), then pass --llama-main cmake-out-android/examples/models/llama/"
    "llama_main")

_OBSERVER = re.compile(r"PyTorchObserver (\{[^\n]*\})")
_RSS = re.compile(r"RSS after finishing text generation: ([0-9.]+) MiB")
_FAILED = re.compile(r"(Failed to (?:create|run|warmup) llama runner|Failed to read prompt file at path: \S+|"
                     r"Failed to load [^\n]*|Failed to encode prompt|Max seq length exceeded[^\n]*|"
                     r"Prompt exceeds KV cache capacity[^\n]*|Missing operator: \S+|"
                     r"ERROR: unknown command line flag '[^']+')")


def parse_llama_main(text: str) -> dict:
    """llama_main's output -> {prompt_tokens, generated_tokens, load_ms, ttft_ms, prefill_tokens_per_s,
    decode_tokens_per_s, rss_mb, error}. Without a PyTorchObserver line `error` names why (the runner stopped)."""
    found = _OBSERVER.findall(text)
    result = dict.fromkeys(("prompt_tokens", "generated_tokens", "load_ms", "rss_mb", *FIGURES))
    result["error"] = None
    stats = None
    if found:
        try:
            stats = json.loads(found[-1])  # the last: a warm-up generation prints none, but be safe
        except ValueError:
            pass
    if not isinstance(stats, dict) or not {"prompt_tokens", "inference_start_ms", "first_token_ms"} <= set(stats):
        failed = _FAILED.search(text)
        result["error"] = failed.group(1) if failed else "no PyTorchObserver line in its output"
        return result
    start, prompt_end, end = stats["inference_start_ms"], stats["prompt_eval_end_ms"], stats["inference_end_ms"]
    result.update(prompt_tokens=int(stats["prompt_tokens"]), generated_tokens=int(stats["generated_tokens"]),
                  load_ms=float(stats["model_load_end_ms"] - stats["model_load_start_ms"]),
                  ttft_ms=float(stats["first_token_ms"] - start))
    if prompt_end > start:
        result["prefill_tokens_per_s"] = stats["prompt_tokens"] * 1e3 / (prompt_end - start)
    if end > prompt_end and stats["generated_tokens"]:
        result["decode_tokens_per_s"] = stats["generated_tokens"] * 1e3 / (end - prompt_end)
    rss = [float(v) for v in _RSS.findall(text) if float(v) > 0]  # 0: the build cannot read its RSS
    result["rss_mb"] = max(rss) if rss else None  # MiB, as the host's peak_rss_mb (2**20 bytes)
    return result


def prompt_texts(tokenizer, lengths, seed: int = 0) -> dict[int, str]:
    """One text per length whose encoding (no special tokens) has that many tokens: seeded random ids decoded,
    re-encoded and cut until the round trip holds (a few passes; the nearest text if it never does)."""
    from edgekd.benchmarks.llm import seeded_prompts

    texts = {}
    for n, ids in seeded_prompts(lengths, len(tokenizer), seed).items():
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for _ in range(8):
            again = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(again) == n:
                break
            pad = seeded_prompts([n], len(tokenizer), seed + len(again))[n]
            text = tokenizer.decode((again + pad)[:n], skip_special_tokens=True)
        texts[n] = text
    return texts


def measure_decoders(serial: str | None, exports: list, settings, prompt_lengths, new_tokens: int,
                     seed: int, sleep) -> dict:
    """Every decoder export (benchmarks/llm.py's DecoderExport) on the phone with llama_main; the result as the
    host's decoder bench writes it (edgekd.bench-llm/1), with `error` set after a fault (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    binary = settings.options.get("llama_main")
    if not binary:
        raise BenchError(f"llama_main is needed for decoder exports on Android and --llama-main was not given; "
                         f"{BUILD_LLAMA_MAIN}")
    if not Path(binary).is_file():
        raise BenchError(f"--llama-main {binary}: no such file; {BUILD_LLAMA_MAIN}")
    for art in exports:
        if not (art.path / "tokenizer.json").is_file():
            raise BenchError(f"{art.path} has no tokenizer.json beside its .pte, which llama_main reads; "
                             f"export it again with edgekd (it writes one)")
    lengths = sorted(set(prompt_lengths))
    # The prompts in the first export's tokenizer (the phone's runner reads the same tokenizer.json)
    texts = prompt_texts(PreTrainedTokenizerFast(tokenizer_file=str(exports[0].path / "tokenizer.json")), lengths,
                         seed)
    adb = Adb(serial, settings.timeout)
    serial = adb.select()
    machine = {"device": f"android:{serial}", "model": adb.prop("ro.product.model"),
               "android": adb.prop("ro.build.version.release"), "abi": adb.prop("ro.product.cpu.abi"),
               "soc": adb.prop("ro.soc.model"), "threads": settings.threads or "runner default",
               "cpu_freq_khz_start": adb.cpu_freqs_khz()}
    machine["os"], machine["cpu"] = f"Android {machine['android']}", " ".join(
        str(x) for x in (machine["model"], machine["soc"]) if x)
    fits = {a.name: [n for n in lengths if n + new_tokens - 1 <= a.max_seq_len] for a in exports}
    skipped = [{"name": a.name, "prompt_tokens": n, "reason": f"{n} prompt + {new_tokens} new tokens exceed its "
                f"context of {a.max_seq_len}"} for a in exports for n in lengths if n not in fits[a.name]]
    rows = {a.name: {"name": a.name, "model": a.model, "runtime": "executorch", "runner": "llama_main",
                     "quant": a.quant, "path": str(a.file), "size_bytes": a.file.stat().st_size,
                     "max_seq_len": a.max_seq_len, "runs_planned": settings.rounds * len(fits[a.name]),
                     "versions": {"runner": "llama_main", "runner_sha256": _sha256(Path(binary))[:16]}}
            for a in exports}
    runs = {a.name: [] for a in exports}
    failed, error = {}, None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adb.shell(f"mkdir -p {DEVICE_DIR}")
            adb.push(Path(binary), f"{DEVICE_DIR}/llama_main")
            adb.shell(f"chmod 755 {DEVICE_DIR}/llama_main")
            for n, text in texts.items():
                file = Path(tmp) / f"prompt-{n}.txt"
                file.write_text(text, encoding="utf-8")
                adb.push(file, f"{DEVICE_DIR}/{file.name}")
            for art in exports:  # each artifact in its own folder: every tokenizer.json keeps its name
                adb.shell(f"mkdir -p {DEVICE_DIR}/{art.name}")
                adb.push(art.file, f"{DEVICE_DIR}/{art.name}/{art.file.name}")
                adb.push(art.path / "tokenizer.json", f"{DEVICE_DIR}/{art.name}/tokenizer.json")
            for _ in range(settings.rounds):
                for n in lengths:
                    for art in exports:  # round-robin: every artifact once per round and length
                        if n not in fits[art.name] or art.name in failed:
                            continue
                        sleep(settings.cooldown)
                        run = _run(adb, art, n, new_tokens, settings)
                        if run["error"]:
                            failed[art.name] = run["error"]
                            error = error or run["error"]
                            continue
                        runs[art.name].append(run)
    except DeviceFault as fault:
        error = str(fault)
    results = [_finish(rows[a.name], runs[a.name], failed.get(a.name)) for a in exports if runs[a.name]]
    machine["cpu_freq_khz_end"] = None if error else adb.cpu_freqs_khz()
    common = [n for n in lengths if all(n in fits[a.name] for a in exports)]
    done = [r for r in results if r["runs_done"] == r["runs_planned"]]
    result = {"schema": SCHEMA, "results": results, "skipped": skipped, **headline(results, common),
              "prompt_lengths": lengths, "new_tokens": new_tokens, "rounds": settings.rounds,
              "warmup": 1 if settings.warmup else 0, "threads": settings.threads or "runner default",
              "prompts": {"kind": "seeded random token ids as text", "seed": seed, "asked_tokens": lengths},
              "machine": machine, "complete": error is None, "finished": [r["name"] for r in done],
              "expected": [a.name for a in exports]}
    if error:
        result["error"] = error
    return result


def _run(adb: Adb, art, prompt_tokens: int, new_tokens: int, settings) -> dict:
    folder = f"{DEVICE_DIR}/{art.name}"
    command = (f"{DEVICE_DIR}/llama_main --model_path={folder}/{shlex.quote(art.file.name)} "
               f"--tokenizer_path={folder}/tokenizer.json --prompt_file={DEVICE_DIR}/prompt-{prompt_tokens}.txt "
               f"--max_new_tokens={new_tokens} --temperature=0 --ignore_eos --cpu_threads={settings.threads or -1}"
               + (" --warmup" if settings.warmup else ""))
    proc = adb.shell(command)
    parsed = parse_llama_main(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or parsed["error"]:
        return {**parsed, "error": f"llama_main failed on {art.name} (exit {proc.returncode}): "
                                   f"{parsed['error'] or _tail(proc)}"}
    return {**parsed, "asked_prompt_tokens": prompt_tokens}


def _finish(row: dict, runs: list[dict], error: str | None) -> dict:
    """A row as the host decoder bench writes it: per asked prompt length the median and spread of each figure
    (benchmarks/llm.py's `headline` then sets the figures of the shortest common length); load time and RSS over
    all runs."""
    row = {**row, "runs_done": len(runs)}
    by_length = {}
    for run in runs:
        by_length.setdefault(run["asked_prompt_tokens"], []).append(run)
    row["by_prompt_tokens"] = {str(n): {"prompt_tokens_on_device": sorted({r["prompt_tokens"] for r in group}),
                                        **{f: latency_stats([r[f] for r in group]) for f in FIGURES
                                           if all(r[f] is not None for r in group)}}
                               for n, group in sorted(by_length.items())}
    row["load_ms"] = latency_stats([r["load_ms"] for r in runs])["p50"]
    rss = [r["rss_mb"] for r in runs if r["rss_mb"] is not None]
    row["peak_rss_mb"] = round(max(rss), 1) if rss else None
    if error:
        row["error"] = error
    return row
