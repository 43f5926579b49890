"""ExecuTorch against LiteRT-LM on the same students: every .pte and .litertlm student export of a generation run,
benched interleaved in one `edgekd bench` (decode and prefill tokens/s, time to first token, load, peak RSS).

    python perf/llm_runtimes.py --run runs/perf-lm-demo [--rounds 5] [--threads 2]

The run must hold both formats of a student (its recipe's targets: android and android/litert). Records
perf/results/llm_runtimes.json (the bench result and the "litert-lm over executorch" ratios of this one run) and
prints them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "llm_runtimes.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/perf-lm-demo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    exports = sorted(str(p) for p in (Path(args.run) / "export").glob("student-*-android-*"))
    out = Path(args.run) / "bench-runtimes"
    command = [sys.executable, "-m", "edgekd", "bench", *exports, "--rounds", str(args.rounds), "--threads",
               str(args.threads), "--prompt-tokens", "64,128", "--out", str(out), "--json"]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    result = json.loads(done.stdout)
    ratios = [r for r in result["ratios"] if r["kind"] == "litert-lm over executorch"]
    if not ratios:
        print(f"no student of {args.run} has both a .pte and a .litertlm export", file=sys.stderr)
        return 1
    print(f"{'variant':<36} {'decode/s':>9} {'prefill/s':>9} {'TTFT ms':>8} {'load ms':>8} {'RSS MB':>7}")
    for row in result["results"]:
        print(f"{row['name']:<36} {row['decode_tokens_per_s']:9.1f} {row['prefill_tokens_per_s']:9.0f} "
              f"{row['ttft_ms']:8.1f} {row['load_ms']:8.0f} {row['peak_rss_mb']:7.0f}")
    for r in ratios:
        print(f"{r['variant']} over {r['over']}: decode {r['decode_speedup']:.2f}x, prefill "
              f"{r['prefill_speedup']:.2f}x, time to first token {r['ttft_speedup']:.2f}x, size {r['size_ratio']:.2f}x "
              f"smaller")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python perf/llm_runtimes.py " + " ".join(sys.argv[1:]),
                                   "ratios": ratios, **result}, indent=2) + "\n")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
