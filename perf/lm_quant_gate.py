"""What the quantized decoder gate sees on a real student: the int4 .pte's logits against its own torchao
reference and against the fp32 model it was quantized from, position by position.

    python perf/lm_quant_gate.py --run runs/lm [--stage distill] [--quant int4] [--prompts 16]

`--run` is a generation run folder (`edgekd demo --task text-generation --out runs/lm`) whose `--stage` (the
student's `distill`, or `finetune` for the teacher) is done. The script exports that model per `--quant` as the
export stage does, takes seeded stratified validation prompts as the gate does, and feeds each the reference's
greedy path (teacher forcing, 16 new tokens). Per position: max |logit difference| / (1 + max |reference logit|)
and whether top-1 agrees, for the .pte against the quantized reference (what the gate judges), the .pte against
the fp32 model (what a gate must not mistake for the reference: a .pte that skipped quantization sits this far
off), and the reference against the fp32 model (the quantization error, the gate's yardstick); then the gate's
own verdict (decoder_parity). Records perf/results/lm_quant_gate.json and prints the quantiles.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lm_quant_gate.json"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", default="distill")
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()

    import torch

    from edgekd.compress.quant import get_spec
    from edgekd.models import load_causal_lm, load_tokenizer
    from edgekd.recipe import load_recipe
    from edgekd.targets.llm_executorch import (
        DecoderRunner,
        decoder_parity,
        export_decoder,
        forced_logits,
        reference_generate,
    )
    from edgekd.tasks.generation import PARITY_NEW_TOKENS, load_records, parity_prompts

    run = Path(args.run)
    recipe = load_recipe(run / "recipe.yaml")
    data = load_records(recipe)
    model_dir = run / args.stage
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    prompts = parity_prompts(data, tokenizer, args.prompts, recipe.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        details = export_decoder(model, Path(tmp) / "m.pte", get_spec(args.quant), recipe.max_seq_len, tokenizer)
        runner = DecoderRunner(Path(tmp) / "m.pte", recipe.bench.threads)
        reference = details["reference"]
        pairs = (".pte vs reference", ".pte vs fp32", "reference vs fp32")
        diffs, agree = {name: [] for name in pairs}, {name: [] for name in pairs}
        for prompt in prompts:
            path = reference_generate(reference, prompt, PARITY_NEW_TOKENS, runner.eos_ids)
            pte, ref, fp32 = forced_logits(runner, prompt, path, reference, model)
            scale = 1 + ref.abs().amax(dim=1)  # the gate's scale: the reference's largest |logit|
            for name, (a, b) in zip(pairs, ((pte, ref), (pte, fp32), (ref, fp32))):
                diffs[name] += ((a - b).abs().amax(dim=1) / scale).tolist()
                agree[name] += (a.argmax(1) == b.argmax(1)).tolist()
        gate = decoder_parity(runner, reference, prompts, PARITY_NEW_TOKENS, float_model=model)
        gate = {k: v for k, v in gate.items() if k != "per_prompt"}
    summary = {}
    for name in diffs:
        values = torch.tensor(diffs[name])
        summary[name] = {"positions": len(values), "top1_agreement": sum(agree[name]) / len(agree[name]),
                         "scaled_logit_diff_quantiles": {f"p{round(q * 100)}": values.quantile(q).item()
                                                         for q in QUANTILES},
                         "scaled_logit_diff_mean": values.mean().item()}
    print(f"{args.quant} .pte of {model_dir} ({len(prompts)} prompts, {summary[pairs[0]]['positions']} positions)")
    print(f"{'':<18} {'top-1':>7} " + " ".join(f"{f'p{round(q * 100)}':>8}" for q in QUANTILES)
          + f" {'mean':>8}")
    for name, row in summary.items():
        quantiles = row["scaled_logit_diff_quantiles"].values()
        print(f"{name:<18} {row['top1_agreement']:7.1%} " + " ".join(f"{v:8.4f}" for v in quantiles)
              + f" {row['scaled_logit_diff_mean']:8.4f}")
    print(f"gate: {'passed' if gate['passed'] else 'REFUSED'} ({gate['rule']}; worst {gate['worst_logit_diff']:.3g})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python perf/lm_quant_gate.py " + " ".join(sys.argv[1:]), "model": str(model_dir),
        "quant": args.quant, "prompts": len(prompts), "new_tokens": PARITY_NEW_TOKENS,
        "wall_s": round(time.time() - started, 1), "scaled_logit_diffs": summary, "gate": gate}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
