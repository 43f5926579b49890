"""Decode tokens/s of a decoder LM: PyTorch eager fp32 `generate` against ExecuTorch fp32 and int4 .pte, interleaved.

    python perf/llm_decode.py [--layers 30] [--prompt-tokens 64] [--new-tokens 64] [--rounds 5] [--threads 2]

The model has SmolLM2-135M's shape (LlamaForCausalLM: 30 layers x 576, 9 heads, 3 KV heads, FFN 1536, vocabulary
49,152, tied embeddings) with random weights from a config (no download; speed does not depend on the weights).
`--layers` makes a shallower stand-in of the same width. Both .pte come from edgekd.targets.llm_executorch
(`export_decoder`: transformers' static-cache wrapper, XNNPACK); int4 is the `int4` QuantSpec (8da4w, group 32,
int4 embeddings). Each round runs every variant once on the same random prompt: eager `generate(do_sample=False)`
with its dynamic cache (first token and decode timed by a streamer), and each .pte's DecoderRunner.generate
(prefill in one call, then one call per token). The figures are medians over rounds; eos never stops a run.
Records perf/results/llm_decode.json (with the command) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "llm_decode.json"
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=True, rope_theta=100000.0)


class _Clock:
    """A generate() streamer: the time each put() arrives (the prompt first, then one per new token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def eager_generate(model, prompt, new_tokens: int) -> dict:
    import torch
    from transformers import GenerationConfig

    greedy = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy, streamer=clock)
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, put before any forward
    n = prompt.shape[1]
    return {"prompt_tokens": n, "new_tokens": len(clock.times) - 1, "ttft_ms": (first - start) * 1e3,
            "prefill_tokens_per_s": n / (first - start), "decode_tokens_per_s": (len(clock.times) - 2) / (last - first)}


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgekd.benchmarks.host import cpu_model
    from edgekd.compress.quant import get_spec
    from edgekd.targets.llm_executorch import DecoderRunner, export_decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edgekd-llm-decode"),
                        help="where the .pte files are kept between runs (reused when the shape matches)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    max_seq_len = args.prompt_tokens + args.new_tokens

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})).eval()
    params = sum(p.numel() for p in model.parameters())
    args.cache.mkdir(parents=True, exist_ok=True)
    variants, exports = {}, {}
    for quant in ("fp32", "int4"):
        file = args.cache / f"smollm2-shape-{args.layers}L-{max_seq_len}-{quant}.pte"
        if not file.exists():
            details = export_decoder(model, file, get_spec(quant), max_seq_len)
            exports[quant] = {k: details[k] for k in ("export_s", "lower_s", "delegated_nodes", "non_delegated_nodes")}
        runner = DecoderRunner(file, threads=args.threads)
        variants[f"executorch {quant}"] = runner
        exports.setdefault(quant, {})
        exports[quant].update(size_mb=round(file.stat().st_size / 1e6, 2), load_ms=round(runner.load_ms, 1))

    prompt = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, args.prompt_tokens), generator=torch.Generator()
                           .manual_seed(1))
    runs = {"pytorch eager fp32": [], **{name: [] for name in variants}}
    eager_generate(model, prompt, 4)  # warm-up: first-call allocations and thread pools
    for runner in variants.values():
        runner.generate(prompt, 4, stop_at_eos=False)
    for _ in range(args.rounds):
        runs["pytorch eager fp32"].append(eager_generate(model, prompt, args.new_tokens))
        for name, runner in variants.items():
            runs[name].append(runner.generate(prompt, args.new_tokens, stop_at_eos=False)[1])

    figures = ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s")
    rows = {name: {f: statistics.median(r[f] for r in rounds) for f in figures} for name, rounds in runs.items()}
    eager = rows["pytorch eager fp32"]["decode_tokens_per_s"]
    for row in rows.values():
        row["decode_speedup_over_eager"] = round(row["decode_tokens_per_s"] / eager, 2)
    record = {"command": " ".join(["python perf/llm_decode.py", *argv]),
              "machine": {"cpu": cpu_model(), "os": platform.platform(), "threads": args.threads},
              "model": {"shape": "SmolLM2-135M" if args.layers == 30 else f"SmolLM2-135M width, {args.layers} layers",
                        **{**SMOLLM2_135M, "num_hidden_layers": args.layers}, "parameters": params,
                        "weights": "random (from a config)"},
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "max_seq_len": max_seq_len,
              "rounds": args.rounds, "exports": exports, "medians": rows, "runs": runs}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{record['model']['shape']}, {params / 1e6:.1f} M parameters, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<22} {'size MB':>8} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'x eager':>8}")
    for name, row in rows.items():
        size = exports.get(name.split()[-1], {}).get("size_mb", "") if name.startswith("executorch") else ""
        print(f"{name:<22} {size:>8} {row['ttft_ms']:>9.1f} {row['prefill_tokens_per_s']:>14.1f} "
              f"{row['decode_tokens_per_s']:>13.1f} {row['decode_speedup_over_eager']:>8.2f}")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
