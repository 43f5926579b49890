"""A dynamic-length ExecuTorch .pte on a text at its own length against the fixed-length one padded to max_length.

    OMP_NUM_THREADS=1 python perf/dynamic_length.py [--iterations 300] [--quant fp32 int8]

The student has the default student's shape: layers [2, 5] of the built-in all-MiniLM-L6-v2
(384 wide), vocabulary trimmed on the finsent training texts (margin 3,000), a fresh 3-label head
(untrained: latency does not depend on it), max_length the p99 token length of the training texts
(edgekd.data.choose_max_length). Each quantization is lowered twice with the real exporter
(`lower_xnnpack`, dynamic_length false and true). The text is the finsent validation text of median
token length. Three variants per quantization, measured interleaved in one process on 1 thread:
fixed .pte on the text padded to max_length (what an app runs without the option), dynamic .pte on
the text at its own length (with it), and dynamic .pte padded to max_length (the cost of dynamic
shapes alone). Records perf/results/dynamic_length.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "dynamic_length.json"
LAYERS, MARGIN = [2, 5], 3000


def build_student():
    """(student, tokenizer, dataset, max_length) of the default student's shape."""
    import torch

    from edgekd.data import choose_max_length, load_dataset
    from edgekd.distill.student import cut_layers, trim_vocabulary
    from edgekd.models import builtin_model_dir, load_classifier, load_tokenizer
    from edgekd.recipe import builtin_recipe

    torch.manual_seed(0)
    dataset = load_dataset(builtin_recipe())
    teacher = load_classifier(str(builtin_model_dir()), label_names=dataset.label_names).eval()
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    student, tokenizer, _ = trim_vocabulary(cut_layers(teacher, LAYERS), tokenizer, dataset.train.texts, MARGIN)
    return student.eval(), tokenizer, dataset, choose_max_length(tokenizer, dataset.train.texts)


def main(argv=None) -> int:
    import numpy as np

    from edgekd.benchmarks.host import Variant, cpu_model, finish, measure_interleaved
    from edgekd.compress.quant import get_spec
    from edgekd.targets.executorch import ExecuTorchRunner, lower_xnnpack
    from edgekd.targets.graph import encode_fixed, encode_unpadded

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quant", nargs="+", default=["fp32", "int8"])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    student, tokenizer, dataset, max_length = build_student()
    texts = dataset.validation.texts
    lengths = [ids.shape[1] for ids, _ in encode_unpadded(tokenizer, texts, max_length)]
    median = sorted(lengths)[len(lengths) // 2]
    text = texts[lengths.index(median)]
    own, padded = encode_unpadded(tokenizer, [text], max_length)[0], encode_fixed(tokenizer, [text], max_length)[0]
    calibration = encode_fixed(tokenizer, dataset.train.texts[:100], max_length)  # unused by fp32/int8 dynamic

    variants, delegation, logits = [], {}, {}
    with tempfile.TemporaryDirectory() as work:
        for quant in args.quant:
            for dynamic in (False, True):
                file = Path(work) / f"{quant}-{'dynamic' if dynamic else 'fixed'}.pte"
                summary = lower_xnnpack(student, get_spec(quant), max_length, calibration, file, dynamic_length=dynamic)
                delegation[file.stem] = {k: summary[k] for k in ("delegate_calls", "non_delegated_nodes")}
                runner = ExecuTorchRunner(file, threads=1)
                logits[quant, dynamic] = runner(*(own if dynamic else padded))
                feeds = [("own length", own), ("padded", padded)] if dynamic else [("padded", padded)]
                for label, inputs in feeds:
                    for _ in range(args.warmup):
                        runner(*inputs)
                    variants.append(Variant({"name": f"{file.stem} @ {label} ({inputs[0].shape[1]} tokens)",
                                             "quant": quant, "dynamic": dynamic, "tokens": int(inputs[0].shape[1])},
                                            runner, inputs))
        measure_interleaved(variants, args.iterations)
    rows = [finish(v) for v in variants]
    for row in rows:
        row["latency_ms"].pop("samples", None)

    ratios = {}
    for quant in args.quant:
        p50 = {(r["dynamic"], r["tokens"]): r["latency_ms"]["p50"] for r in rows if r["quant"] == quant}
        ratios[quant] = {
            "fixed_padded_over_dynamic_own_length": round(p50[False, max_length] / p50[True, median], 2),
            "dynamic_padded_over_fixed_padded": round(p50[True, max_length] / p50[False, max_length], 2),
            # The dynamic .pte at own length against the fixed one padded: the same answer, so equal work is timed.
            "max_abs_logit_diff": float(np.abs(logits[quant, True] - logits[quant, False]).max())}
    record = {"command": " ".join(["OMP_NUM_THREADS=1 python perf/dynamic_length.py", *argv]),
              "machine": {"cpu": cpu_model(), "os": platform.platform(), "threads": 1},
              "student": {"layers": LAYERS, "vocab_margin": MARGIN, "max_length": max_length},
              "text": {"tokens": median, "validation_token_lengths": {
                  "median": median, "mean": round(statistics.mean(lengths), 1), "max": max(lengths)}},
              "iterations": args.iterations, "delegation": delegation, "rows": rows, "ratios": ratios}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")

    print(f"max_length {max_length}; validation text of median length: {median} tokens")
    print(f"{'variant':<40} {'p50 ms':>8} {'p90 ms':>8}")
    for row in rows:
        print(f"{row['name']:<40} {row['latency_ms']['p50']:>8.3f} {row['latency_ms']['p90']:>8.3f}")
    for quant, ratio in ratios.items():
        print(f"{quant}: fixed padded / dynamic at own length = {ratio['fixed_padded_over_dynamic_own_length']}x; "
              f"dynamic padded / fixed padded = {ratio['dynamic_padded_over_fixed_padded']}x; "
              f"max |logit diff| {ratio['max_abs_logit_diff']:.1e}")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
