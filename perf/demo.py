"""Measure `edgekd demo` end to end: wall time of each stage and the teacher-vs-student table.

    python perf/demo.py [--out runs/perf-demo]

Prints the table and records it in perf/results/demo.json (machine, versions, every variant's
size, latency distribution summary, accuracy, the ratios of this one run, and stage wall times).
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

RESULTS = Path(__file__).parent / "results" / "demo.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/perf-demo")
    args = parser.parse_args()
    out = Path(args.out)
    try:  # only a run directory edgekd wrote is removed: a user's folder is refused
        check_run_dir(out)
    except StageError as exc:
        raise SystemExit(f"error: {exc}") from None
    shutil.rmtree(out, ignore_errors=True)  # a cold run: nothing cached
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "edgekd", "demo", "--out", str(out), "--json"],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    wall = time.time() - started
    summary = json.loads(done.stdout)
    print(f"{'variant':<40} {'size MB':>9} {'p50 ms':>8} {'p90 ms':>8} {'acc %':>6} {'F1':>6} {'params M':>9}")
    for v in summary["variants"]:
        print(f"{v['name']:<40} {v['size_bytes'] / 1e6:9.2f} {v['latency_ms']['p50']:8.2f} "
              f"{v['latency_ms']['p90']:8.2f} {100 * v['accuracy']:6.1f} {v['macro_f1']:6.3f} {v['params'] / 1e6:9.2f}")
    for r in summary["ratios"]:
        print(f"teacher / {r['variant']}: {r['size_x']}x smaller, {r['latency_p50_x']}x faster (p50), "
              f"{r['accuracy_delta_points']:+.1f} accuracy points")
    print(f"baseline {summary['baseline']['name']}: {100 * summary['baseline']['accuracy']:.1f} %")
    for s in summary["stages"]:
        print(f"stage {s['stage']:<24} {s['wall_s']:8.1f} s")
    print(f"total wall time {wall:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python perf/demo.py", "total_wall_s": round(wall, 1), **summary},
                                  indent=2) + "\n")
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
