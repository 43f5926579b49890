"""Decoder LMs on an Android phone: ExecuTorch's LLM runner `llama_main` (a .pte) and LiteRT-LM's benchmark
binary (a .litertlm, benchmarks/android_litert_lm.py) over adb, interleaved in one round-robin.

    edgekd bench EXPORT... --device android[:SERIAL] [--llama-main PATH] [--litert-lm-main PATH]
                 [--prompt-tokens 64,128] --out DIR

`llama_main` (examples/models/llama/main.cpp of an ExecuTorch checkout, built for Android) is pushed to
/data/local/tmp/edgekd with each .pte and the tokenizer.json beside it. For each round and prompt length, every
artifact runs once in turn (A B A B ..., as the host bench): greedy (--temperature 0), eos ignored, `new_tokens`
tokens, a warm-up generation first (--warmup), the prompt text from a pushed file. The runner's TextLLMRunner prints
one `PyTorchObserver {json}` line per generation (extension/llm/runner/stats.h, `print_report`): its millisecond
timestamps give load time, time to first token, prefill and decode tokens/s by stats.h's own definitions (decode:
the tokens after the prefill's first over the time after it); its "RSS after finishing text generation" line, where
the build logs it, the resident memory. Prompts are seeded token ids decoded to text and re-encoded until their
length holds (`prompt_texts`); the phone's tokenizer count is recorded beside the asked length. A .litertlm
needs no tokenizer.json: LiteRT-LM's benchmark is given the length and makes its own prompt. Each binary is needed
only when exports of its runtime are benched.

A device fault (phone gone, runner hung) keeps the runs finished so far, with `complete: false`; a runner that
fails on one artifact stops that artifact only. Nothing here has run on a phone: the parsers are tested on the
runners' output (users' pastes, the same C++ runner in the executorch wheel here, lines rendered from LiteRT-LM's
source), the wire on a fake adb.
"""
from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

from edgekd.benchmarks.android import DEVICE_DIR, Adb, _sha256, _tail
from edgekd.benchmarks.android_litert_lm import GET_LITERT_LM_MAIN, run_litert_lm
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
    """Every decoder export (benchmarks/llm.py's DecoderExport) on the phone: a .pte with llama_main, a .litertlm
    with LiteRT-LM's benchmark binary (benchmarks/android_litert_lm.py), all in one round-robin; the result as the
    host's decoder bench writes it (edgekd.bench-llm/1), with `error` set after a fault (see the module docstring)."""
    binaries = _binaries(exports, settings)
    lengths = sorted(set(prompt_lengths))
    ptes = [a for a in exports if a.runtime == "executorch"]
    for art in ptes:
        if not (art.path / "tokenizer.json").is_file():
            raise BenchError(f"{art.path} has no tokenizer.json beside its .pte, which llama_main reads; "
                             f"export it again with edgekd (it writes one)")
    # The prompts in the first .pte's tokenizer (the phone's runner reads the same tokenizer.json); LiteRT-LM's
    # benchmark makes its own prompt of the asked length
    texts = prompt_texts(_tokenizer(ptes[0]), lengths, seed) if ptes else {}
    adb = Adb(serial, settings.timeout)
    serial = adb.select()
    machine = {"device": f"android:{serial}", "model": adb.prop("ro.product.model"),
               "android": adb.prop("ro.build.version.release"), "abi": adb.prop("ro.product.cpu.abi"),
               "soc": adb.prop("ro.soc.model"), "threads": settings.threads or "runner default",
               "cpu_freq_khz_start": adb.cpu_freqs_khz()}
    machine["os"], machine["cpu"] = f"Android {machine['android']}", " ".join(
        str(x) for x in (machine["model"], machine["soc"]) if x)
    # llama_main's prefill gives the first token, so n + new - 1 positions; LiteRT-LM's benchmark decodes `new`
    # steps after the prefill (its time to first token is the prefill plus one of them): n + new
    fits = {a.name: [n for n in lengths if n + new_tokens - (a.runtime == "executorch") <= a.max_seq_len]
            for a in exports}
    skipped = [{"name": a.name, "prompt_tokens": n, "reason": f"{n} prompt + {new_tokens} new tokens exceed its "
                f"context of {a.max_seq_len}"} for a in exports for n in lengths if n not in fits[a.name]]
    rows = {a.name: {"name": a.name, "model": a.model, "runtime": a.runtime, "runner": RUNNERS[a.runtime][0],
                     "quant": a.quant, "path": str(a.file), "size_bytes": a.file.stat().st_size,
                     "max_seq_len": a.max_seq_len, "runs_planned": settings.rounds * len(fits[a.name]),
                     "versions": {"runner": binaries[a.runtime].name,
                                  "runner_sha256": _sha256(binaries[a.runtime])[:16]}}
            for a in exports}
    runs = {a.name: [] for a in exports}
    failed, error = {}, None
    try:
        _push(adb, exports, binaries, texts)
        if settings.warmup:  # the .pte warms up inside llama_main (--warmup); LiteRT-LM's first load of a bundle
            for art in exports:  # (weights arranged for this CPU, caches) in one discarded run
                if art.runtime == "litert-lm" and fits[art.name]:
                    warm = run_litert_lm(adb, art, fits[art.name][0], new_tokens, settings)
                    if warm["error"]:
                        failed[art.name] = warm["error"]
                        error = error or warm["error"]
        for _ in range(settings.rounds):
            for n in lengths:
                for art in exports:  # round-robin: every artifact once per round and length
                    if n not in fits[art.name] or art.name in failed:
                        continue
                    sleep(settings.cooldown)
                    run = RUNNERS[art.runtime][2](adb, art, n, new_tokens, settings)
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
    prompts = {"kind": "seeded random token ids as text", "seed": seed, "asked_tokens": lengths}
    if len(ptes) < len(exports):
        prompts["litert-lm"] = "the runtime's own benchmark prompt of the asked length (--benchmark_prefill_tokens)"
    result = {"schema": SCHEMA, "results": results, "skipped": skipped, **headline(results, common),
              "prompt_lengths": lengths, "new_tokens": new_tokens, "rounds": settings.rounds,
              "warmup": 1 if settings.warmup else 0, "threads": settings.threads or "runner default",
              "prompts": prompts, "machine": machine, "complete": error is None,
              "finished": [r["name"] for r in done], "expected": [a.name for a in exports]}
    if error:
        result["error"] = error
    return result


def _binaries(exports: list, settings) -> dict[str, Path]:
    """The runner binary of each runtime among the exports (only those: a .pte alone needs no LiteRT-LM)."""
    binaries = {}
    for runtime in dict.fromkeys(a.runtime for a in exports):
        if runtime not in RUNNERS:
            art = next(a for a in exports if a.runtime == runtime)
            raise BenchError(f"{art.name}: a {art.manifest['params']['format']} export does not run on Android; "
                             f"bench it on its own device")
        name, how, _ = RUNNERS[runtime]
        flag, suffix = "--" + name.replace("_", "-"), ".pte" if runtime == "executorch" else ".litertlm"
        given = settings.options.get(name)
        if not given:
            raise BenchError(f"{name} is needed for {suffix} exports on Android and {flag} was not given; {how}")
        if not Path(given).is_file():
            raise BenchError(f"{flag} {given}: no such file; {how}")
        binaries[runtime] = Path(given)
    return binaries


def _tokenizer(art):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(art.path / "tokenizer.json"))


def _push(adb: Adb, exports: list, binaries: dict[str, Path], texts: dict[int, str]) -> None:
    """The runners (under the names the commands use), the prompt files and each export in its own folder."""
    adb.shell(f"mkdir -p {DEVICE_DIR}")
    for runtime, binary in binaries.items():
        name = RUNNERS[runtime][0]
        adb.push(binary, f"{DEVICE_DIR}/{name}")
        adb.shell(f"chmod 755 {DEVICE_DIR}/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, text in texts.items():
            file = Path(tmp) / f"prompt-{n}.txt"
            file.write_text(text, encoding="utf-8")
            adb.push(file, f"{DEVICE_DIR}/{file.name}")
    for art in exports:  # each artifact in its own folder: every tokenizer.json keeps its name
        adb.shell(f"mkdir -p {DEVICE_DIR}/{art.name}")
        adb.push(art.file, f"{DEVICE_DIR}/{art.name}/{art.file.name}")
        if art.runtime == "executorch":
            adb.push(art.path / "tokenizer.json", f"{DEVICE_DIR}/{art.name}/tokenizer.json")


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


# runtime -> (the runner: its settings.options key, CLI flag and name on the phone), how to get it, one run
RUNNERS = {"executorch": ("llama_main", BUILD_LLAMA_MAIN, _run),
           "litert-lm": ("litert_lm_main", GET_LITERT_LM_MAIN, run_litert_lm)}


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
