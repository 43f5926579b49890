"""Where the export of a decoder LM to ExecuTorch spends its time: each phase of `export_decoder`, fp32 and int4.

    OMP_NUM_THREADS=1 python perf/llm_export_time.py [--quants int4,fp32] [--layers 30] [--max-seq-len 256]
                                                     [--compare verifier|dim-order|none] [--out FILE]

The model has SmolLM2-135M's shape (perf/llm_decode.py: LlamaForCausalLM, 30 layers x 576, 9 heads, 3 KV heads,
FFN 1536, vocabulary 49,152, tied embeddings) with random weights from a config; export time does not depend on
the weights. One export per quant through edgekd.targets.llm_executorch.export_decoder (transformers' static-cache
wrapper, XNNPACK; int4 = the `int4` QuantSpec: 8da4w group 32, int4 embeddings, no HQQ), timed per phase:
quantize (torchao quantize_), torch_export (strict), to_edge_transform_and_lower, to_executorch, save. Each phase
is logged as it ends, and the results file is rewritten after each export, so a run stopped midway keeps what
finished. An unrecorded 1-layer export warms the process up first. `--compare` exports each quant a second
time, right before its default export, with one lowering setting turned from edgekd's default to the other, and
prints the ratio of their lowering times from this one run: `verifier` (the default) runs ExecuTorch's
edge-dialect verifier ("<quant>+verifier"), `dim-order` keeps the dim-order pass ExecuTorch's LLM export skips
("<quant>+dim-order"). Records perf/results/llm_export_time.json (or `--out`) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_decode import SMOLLM2_135M  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_export_time.json"
PHASES = ("quantize", "torch_export", "to_edge_transform_and_lower", "to_executorch", "save")
# --compare: the export_decoder settings that turn each lowering option from edgekd's default to the other
COMPARED = {"verifier": {"verify_ir": True}, "dim-order": {"skip_dim_order": False}}


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgekd.benchmarks.host import cpu_model
    from edgekd.compress.quant import get_spec
    from edgekd.targets.llm_executorch import export_decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="int4,fp32")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--compare", choices=(*COMPARED, "none"), default="verifier")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("edgekd.export").setLevel(logging.INFO)

    torch.manual_seed(0)
    shape = {**SMOLLM2_135M, "num_hidden_layers": args.layers}
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    record = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)"),
                                   "python perf/llm_export_time.py", *argv]),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(),
                          "torch_threads": torch.get_num_threads()},
              "versions": _versions(),
              "model": {"shape": "SmolLM2-135M" if args.layers == 30 else f"SmolLM2-135M width, {args.layers} layers",
                        **shape, "parameters": sum(p.numel() for p in model.parameters()),
                        "weights": "random (from a config)"},
              "max_seq_len": args.max_seq_len, "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # A first export in a process pays the warm-up (imports, dynamo's caches): a small one, not recorded, so
        # the first recorded export is not charged for it.
        tiny = LlamaForCausalLM(LlamaConfig(**{**shape, "num_hidden_layers": 1, "vocab_size": 256})).eval()
        export_decoder(tiny, Path(tmp) / "warm-up.pte", get_spec("fp32"), args.max_seq_len)
        compared = args.compare != "none"
        # (name suffix, export_decoder settings): the other setting first, then edgekd's default
        variants = ([(f"+{args.compare}", COMPARED[args.compare])] if compared else []) + [("", {})]
        for quant, (suffix, settings) in ((q, v) for q in args.quants.split(",") for v in variants):
            name = quant + suffix
            started = time.perf_counter()
            details = export_decoder(model, Path(tmp) / f"{quant}.pte", get_spec(quant), args.max_seq_len,
                                     **settings)
            record["exports"][name] = {"total_s": round(time.perf_counter() - started, 1),
                                        "phases_s": details["phases_s"],
                                        "size_mb": round(details["size_bytes"] / 1e6, 2),
                                        "delegated_nodes": details["delegated_nodes"],
                                        "non_delegated_nodes": details["non_delegated_nodes"]}
            args.out.parent.mkdir(exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{record['model']['shape']}, max_seq_len {args.max_seq_len}, torch threads {torch.get_num_threads()}")
    print(f"{'quant':<15} " + " ".join(f"{p:>28}" for p in PHASES) + f" {'total s':>8} {'size MB':>8}")
    for name, row in record["exports"].items():
        cells = " ".join(f"{row['phases_s'][p]:>20.1f} ({row['phases_s'][p] / row['total_s']:>4.0%})" for p in PHASES)
        print(f"{name:<15} {cells} {row['total_s']:>8.1f} {row['size_mb']:>8.2f}")
    for quant in args.quants.split(",") if compared else ():
        on, off = record["exports"][f"{quant}+{args.compare}"], record["exports"][quant]
        lower = "to_edge_transform_and_lower"
        ratio = on["phases_s"][lower] / off["phases_s"][lower]
        record.setdefault(f"{args.compare}_lowering_ratio", {})[quant] = round(ratio, 2)
        print(f"{quant}: lowering with {args.compare} {'on' if args.compare == 'verifier' else 'kept'} takes "
              f"{ratio:.2f}x as long as edgekd's default; whole export {on['total_s'] / off['total_s']:.2f}x")
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded in {args.out}")
    return 0


def _versions() -> dict:
    from importlib import metadata
    return {name: metadata.version(name) for name in ("torch", "executorch", "torchao", "transformers")}


if __name__ == "__main__":
    raise SystemExit(main())
