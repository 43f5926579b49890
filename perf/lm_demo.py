"""Measure `edgekd demo --task text-generation` end to end: stage wall times, the teacher-vs-student table, and
the issue's bars from this one run.

    python perf/lm_demo.py [--out runs/perf-lm-demo] [--resume]

Records perf/results/lm_demo.json (the report's summary: every variant's size, TTFT, prefill and decode
tokens/s, perplexity, task accuracy, parity; the ratios of this run; stage wall times; the total) and prints
the table and whether the int4 student .pte is >= 8x smaller than the fp32 teacher .pte, decodes >= 3x the
teacher's tokens/s and >= 1.5x PyTorch eager fp32 of the same student, and the LiteRT-LM student's decode tokens/s
over the .pte's. --resume keeps what a stopped or failed run in --out
finished (the chain reuses each stage whose key matches; the stage wall times are each stage's own run, from its
manifest, and "total_wall_s" is this invocation's).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgekd.errors import StageError
from edgekd.manifest import check_run_dir

RESULTS = Path(__file__).parent / "results" / "lm_demo.json"
BARS = {"size_ratio": 8.0, "decode_speedup_over_teacher": 3.0, "decode_speedup_over_eager": 1.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/perf-lm-demo")
    parser.add_argument("--resume", action="store_true", help="keep the stages a run in --out finished")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.resume:
        try:  # only a run directory edgekd wrote is removed: a user's folder is refused
            check_run_dir(out)
        except StageError as exc:
            raise SystemExit(f"error: {exc}") from None
        shutil.rmtree(out, ignore_errors=True)  # a cold run: nothing cached
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "edgekd", "demo", "--task", "text-generation", "--out", str(out),
                           "--json"], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    wall = time.time() - started
    summary = json.loads(done.stdout)
    print(f"{'variant':<36} {'size MB':>8} {'TTFT ms':>8} {'prefill/s':>9} {'decode/s':>8} {'ppl':>7} {'task acc':>8}")
    def cell(value, spec: str, width: int) -> str:  # a Core ML package has no speed measured here
        return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"

    for v in summary["variants"]:
        accuracy = v["task_accuracy"]["accuracy"] if v["task_accuracy"] else float("nan")
        print(f"{v['name']:<36} {v['size_bytes'] / 1e6:8.1f} {cell(v['ttft_ms'], '.0f', 8)} "
              f"{cell(v['prefill_tokens_per_s'], '.0f', 9)} {cell(v['decode_tokens_per_s'], '.1f', 8)} "
              f"{v['perplexity']:7.3f} {100 * accuracy:7.1f}%")
    for name, row in summary["eager"].items():
        print(f"{name + ' PyTorch eager fp32':<36} {'':>8} {row['ttft_ms']:8.0f} {row['prefill_tokens_per_s']:9.0f} "
              f"{row['decode_tokens_per_s']:8.1f}")
    for r in summary.get("runtime_ratios", []):
        print(f"{r['variant']}: {r['decode_speedup']:.2f}x the decode tokens/s of {r['over']} (LiteRT-LM over "
              f"ExecuTorch, interleaved in this run), {r['prefill_speedup']:.2f}x its prefill")
    bars = _bars(summary)
    for name, (value, bar) in bars.items():
        print(f"{name}: {value:.2f} (bar {bar}): {'met' if value >= bar else 'NOT met'}")
    for s in summary["stages"]:
        print(f"stage {s['stage']:<24} {s['wall_s']:8.1f} s")
    print(f"total wall time {wall:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    command = "python perf/lm_demo.py" + (" --resume" if args.resume else "")
    RESULTS.write_text(json.dumps({"command": command, "resumed": args.resume, "total_wall_s": round(wall, 1),
                                   "bars": {k: {"value": v, "bar": b} for k, (v, b) in bars.items()},
                                   **summary}, indent=2) + "\n")
    print(f"recorded in {RESULTS}")
    return 0


def _bars(summary: dict) -> dict:
    """The issue's three ratios for the int4 student, from the report's ratios of this run."""
    found = {}
    for r in summary["ratios"]:
        if not r["variant"].endswith("int4-android-executorch"):  # the bars are the .pte's
            continue
        if "size_ratio" in r:
            found["size_ratio"] = (r["size_ratio"], BARS["size_ratio"])
            found["decode_speedup_over_teacher"] = (r["decode_speedup"], BARS["decode_speedup_over_teacher"])
        else:
            found["decode_speedup_over_eager"] = (r["decode_speedup"], BARS["decode_speedup_over_eager"])
    return found


if __name__ == "__main__":
    raise SystemExit(main())
