"""What each decoder quantization costs a real student: perplexity and task accuracy of the torchao-quantized
model (the reference its ExecuTorch .pte is gated against), spec by spec, on the same test records.

    python perf/lm_quant_quality.py --run runs/lm [--stage distill]
                                    [--specs fp32,int4,int4+emb8,int4-g64,int4-weights,int8,int4-hqq]
                                    [--results FILE]

`--run` is a finished generation run (`edgekd demo --task text-generation --out runs/lm`); its `--stage` model is
quantized per spec with edgekd.targets.llm_executorch.quantize_decoder (what export_decoder lowers) and scored
by the chain's own evaluation (teacher-forced perplexity of the completions, greedy task accuracy) on the run's
test records. Besides the built-in specs, "int4+emb8" is the `int4` spec with int8 instead of int4 embeddings
(the issue's "int8 embeddings"). Records perf/results/lm_quant_quality.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lm_quant_quality.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", default="distill")
    parser.add_argument("--specs", default="fp32,int4,int4+emb8,int4-g64,int4-weights,int8")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    from edgekd.compress.quant import get_spec
    from edgekd.errors import EdgeKDError
    from edgekd.models import load_causal_lm, load_tokenizer
    from edgekd.recipe import load_recipe
    from edgekd.targets.llm_executorch import quantize_decoder
    from edgekd.tasks.generation import _evaluate, load_records

    run = Path(args.run)
    recipe = load_recipe(run / "recipe.yaml")
    data = load_records(recipe)
    model_dir = run / args.stage
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    rows = {}
    for name in args.specs.split(","):
        spec = replace(get_spec("int4"), name="int4+emb8", embeddings="int8") if name == "int4+emb8" else get_spec(name)
        started = time.time()
        try:
            quantized = model if spec.is_float else quantize_decoder(model, spec)
        except EdgeKDError as exc:  # e.g. a group size that does not divide the model's widths
            print(f"{name}: refused: {exc}")
            continue
        test = _evaluate(quantized, tokenizer, data.test, recipe.data.max_length)
        rows[name] = {"spec": spec.to_dict(), "perplexity": test["perplexity"]["perplexity"],
                      "task_accuracy": (test.get("task_accuracy") or {}).get("accuracy"),
                      "n": (test.get("task_accuracy") or {}).get("n"), "wall_s": round(time.time() - started, 1)}
        print(json.dumps({name: rows[name]}), flush=True)
    base = rows.get("fp32")
    print(f"\n{'spec':<14} {'ppl':>7} {'vs fp32':>8} {'task acc':>9}")
    for name, row in rows.items():
        change = f"{100 * (row['perplexity'] / base['perplexity'] - 1):+7.1f}%" if base else ""
        print(f"{name:<14} {row['perplexity']:7.3f} {change:>8} {100 * row['task_accuracy']:8.1f}%")
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps({"command": "python perf/lm_quant_quality.py " + " ".join(sys.argv[1:]),
                                   "model": str(model_dir), "test_records": len(data.test), "specs": rows},
                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
