"""The int8 ExecuTorch student against ONNX Runtime int8 of the same student and PyTorch eager fp32.

    python perf/onnx_compare.py [--iterations 400] [--threads 1 2] [--profile]

The student has the demo's shape with real weights: layers [2, 5] of the built-in all-MiniLM-L6-v2
(BERT, 384 wide, 12 heads, FFN 1536), vocabulary trimmed on the finsent training texts with the
demo's margin of 3,000 tokens, max_length 40, a fresh 3-label head (untrained: latency does not
depend on it). It is exported with the real exporter (android/executorch `lower_xnnpack`, PT2E
int8 + int8 embeddings, XNNPACK) and with edgekd's ONNX baseline (torch.onnx, quantize_dynamic int8).
Each thread count runs in its own process (ExecuTorch's thread pool is set once per process),
and in it the three runtimes are measured interleaved, A B C A B C, on one finsent validation text.
With --profile the ExecuTorch int8 program is also run with an ETDump and summarized per operator
with ExecuTorch's Inspector: which ops run outside XNNPACK and what each costs.
Records perf/results/onnx_compare.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "onnx_compare.json"
LAYERS, MAX_LENGTH, MARGIN = [2, 5], 40, 3000


def build(work: Path) -> dict:
    """The student stage directory, its int8 .pte, and the ONNX files; returns paths and facts."""
    import numpy as np
    import torch

    from edgekd.benchmarks.runtimes import onnx_model
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.distill.student import cut_layers, trim_vocabulary
    from edgekd.manifest import write_stage
    from edgekd.models import builtin_model_dir, load_classifier, load_tokenizer
    from edgekd.recipe import builtin_recipe
    from edgekd.targets.executorch import ExecuTorchRunner, lower_xnnpack
    from edgekd.targets.graph import ExportWrapper, encode_fixed, run_graph

    torch.manual_seed(0)
    dataset = load_dataset(builtin_recipe())
    teacher = load_classifier(str(builtin_model_dir()), label_names=dataset.label_names).eval()
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    student, tokenizer, kept = trim_vocabulary(cut_layers(teacher, LAYERS), tokenizer, dataset.train.texts, MARGIN)
    stage_dir = work / "student"
    with write_stage(stage_dir, "distill", {"perf": "onnx_compare", "layers": LAYERS, "margin": MARGIN}) as stage:
        student.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        stage.extra["max_length"] = MAX_LENGTH
    calibration = encode_fixed(tokenizer, dataset.train.texts[:100], MAX_LENGTH)
    pte = work / "perf-student_xnnpack_int8.pte"
    delegation = lower_xnnpack(student.eval(), get_spec("int8"), MAX_LENGTH, calibration, pte)
    onnx_int8 = onnx_model(stage_dir, "int8", MAX_LENGTH, work / "onnx")
    # Agreement of the two int8 models with fp32 PyTorch on 200 validation texts: both must be the same model.
    texts = encode_fixed(tokenizer, dataset.validation.texts[:200], MAX_LENGTH)
    reference = run_graph(ExportWrapper(student), texts).numpy().argmax(-1)
    from edgekd.benchmarks.runtimes import OnnxRunner
    et, ort = ExecuTorchRunner(pte, 1), OnnxRunner(onnx_int8, 1)
    agreement = {name: float(np.mean(np.concatenate([r(i, m) for i, m in texts]).argmax(-1) == reference))
                 for name, r in (("executorch_int8", et), ("onnxruntime_int8", ort))}
    sample = texts[0]
    np.save(work / "ids.npy", sample[0].numpy())
    np.save(work / "mask.npy", sample[1].numpy())
    return {"stage": str(stage_dir), "pte": str(pte), "onnx_int8": str(onnx_int8),
            "vocab_rows": len(kept), "params": sum(p.numel() for p in student.parameters()),
            "pte_bytes": pte.stat().st_size, "onnx_int8_bytes": Path(onnx_int8).stat().st_size,
            "top1_agreement_with_fp32": agreement,
            "delegation": {k: delegation[k] for k in ("delegated_nodes", "non_delegated_nodes", "delegate_calls",
                                                       "non_delegated_ops")}}


def measure(work: Path, threads: int, iterations: int, warmup: int) -> dict:
    """One process, one thread count: the three runtimes interleaved."""
    import numpy as np
    import torch

    from edgekd.benchmarks.host import Variant, finish, measure_interleaved, peak_rss_mb
    from edgekd.benchmarks.runtimes import OnnxRunner, TorchEagerRunner
    from edgekd.targets.executorch import ExecuTorchRunner

    facts = json.loads((work / "facts.json").read_text())
    inputs = (torch.from_numpy(np.load(work / "ids.npy")), torch.from_numpy(np.load(work / "mask.npy")))
    runners = {"executorch_int8": ExecuTorchRunner(Path(facts["pte"]), threads),
               "onnxruntime_int8": OnnxRunner(Path(facts["onnx_int8"]), threads, "int8"),
               "torch_eager_fp32": TorchEagerRunner(Path(facts["stage"]), threads)}
    variants = []
    for name, runner in runners.items():
        for _ in range(warmup):
            runner(*inputs)
        variants.append(Variant({"name": name, "load_ms": round(runner.load_ms, 2), "versions": runner.versions()},
                                runner, inputs))
    measure_interleaved(list(variants), iterations)
    rows = {v.row["name"]: finish(v) for v in variants}
    for row in rows.values():
        row["latency_ms"].pop("samples")
    return {"threads": threads, "rows": rows, "peak_rss_mb": round(peak_rss_mb(), 1)}


def profile(work: Path, runs: int = 50) -> dict:
    """ExecuTorch int8 with an ETDump: time per operator, delegated or not (Inspector), over `runs` executions."""
    import executorch.kernels.quantized  # noqa: F401
    import numpy as np
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    facts = json.loads((work / "facts.json").read_text())
    module = _load_for_executorch(facts["pte"], enable_etdump=True, debug_buffer_size=0)
    inputs = (torch.from_numpy(np.load(work / "ids.npy")), torch.from_numpy(np.load(work / "mask.npy")))
    for _ in range(runs):
        module.forward(inputs)
    etdump = work / "et.etdp"
    module.write_etdump_result_to_file(str(etdump))
    frame = Inspector(etdump_path=str(etdump)).to_dataframe()
    frame = frame[frame["event_block_name"] == "Execute"]
    ops = {}
    for _, event in frame.iterrows():
        name = str(event["event_name"])
        times = event["raw"] if isinstance(event["raw"], list) else []
        if not times or name == "Method::execute":
            continue
        entry = ops.setdefault(name, {"delegated": bool(event.get("is_delegated_op")), "ms": 0.0, "calls": 0})
        entry["ms"] += float(np.mean(times))  # ETDump times in ms, averaged over the runs
        entry["calls"] += 1
    total = frame[frame["event_name"] == "Method::execute"]["raw"]
    per_run = float(np.mean(total.iloc[0])) if len(total) else None
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"])[:15])
    return {"runs": runs, "method_execute_ms": per_run, "top_events": top}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="also profile the ExecuTorch int8 program (ETDump)")
    parser.add_argument("--child", nargs=2, metavar=("WORK", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), int(args.child[1]), args.iterations, args.warmup)))
        return 0
    if args.profile_child:
        print(json.dumps(profile(Path(args.profile_child))))
        return 0

    from edgekd.benchmarks.host import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        facts = build(work)
        (work / "facts.json").write_text(json.dumps(facts))
        runs = []
        for threads in args.threads:
            done = subprocess.run([sys.executable, __file__, "--child", str(work), str(threads), "--iterations",
                                   str(args.iterations), "--warmup", str(args.warmup)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        prof = None
        if args.profile:
            done = subprocess.run([sys.executable, __file__, "--profile-child", str(work)], stdout=subprocess.PIPE,
                                  text=True, check=True)
            prof = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"student: layers {LAYERS} of all-MiniLM-L6-v2, {facts['vocab_rows']} vocabulary rows, "
          f"{facts['params'] / 1e6:.2f} M parameters, max_length {MAX_LENGTH}; "
          f".pte int8 {facts['pte_bytes'] / 1e6:.2f} MB, ONNX int8 {facts['onnx_int8_bytes'] / 1e6:.2f} MB; "
          f"top-1 agreement with fp32 "
          f"{facts['top1_agreement_with_fp32']}")
    print(f"{'threads':>7} {'runtime':<18} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'cpu ms':>8} "
          f"{'vs ORT int8':>12}")
    for run in runs:
        ort = run["rows"]["onnxruntime_int8"]["latency_ms"]["p50"]
        for name, row in run["rows"].items():
            lat = row["latency_ms"]
            print(f"{run['threads']:>7} {name:<18} {lat['p50']:8.3f} {lat['p90']:8.3f} {lat['mean']:8.3f} "
                  f"{row['cpu_ms_per_inference']:8.3f} {ort / lat['p50']:11.2f}x")
    if prof:
        print(f"ETDump, ExecuTorch int8, Method::execute {prof['method_execute_ms']:.3f} ms; top events:")
        for name, entry in prof["top_events"].items():
            print(f"  {name:<60} {'XNNPACK' if entry['delegated'] else 'portable':<9} {entry['ms']:7.3f} ms "
                  f"({entry['calls']} calls)")
    record = {"command": "python perf/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform()},
              "student": facts, "iterations": args.iterations, "warmup": args.warmup, "runs": runs,
              "ratios": [{"threads": r["threads"],
                          "executorch_int8_speedup_vs_onnxruntime_int8_p50":
                              round(r["rows"]["onnxruntime_int8"]["latency_ms"]["p50"] /
                                    r["rows"]["executorch_int8"]["latency_ms"]["p50"], 3),
                          "executorch_int8_speedup_vs_torch_fp32_p50":
                              round(r["rows"]["torch_eager_fp32"]["latency_ms"]["p50"] /
                                    r["rows"]["executorch_int8"]["latency_ms"]["p50"], 3)} for r in runs],
              "profile": prof}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
