"""The budget search on BANKING77, end to end through `edgekd run`: the front and the choice.

    python perf/banking77_search.py [--out runs/perf-banking77-search] [--budget 1.0] [--objective latency]
                                    [--search-quant int8 int4] [--qat-epochs 0] [--budget-from student]
    python perf/banking77_search.py --layers 1 3 5 --quant int8 int4 --results perf/results/banking77_3L.json

Runs the whole pipeline on BANKING77 (teacher all-MiniLM-L6-v2 fine-tuned 8 epochs, the trimmed student
keeping the teacher's `--layers` (default 2 and 5, as in perf/banking77.py), then `compress.budget`: the
search over QuantSpecs and pruning levels, each candidate exported and timed interleaved in the ExecuTorch
runtime here),
then prints every candidate (validation accuracy, size, latency p50) with the front and the
choice, the exported artifacts' test accuracy, and records perf/results/banking77_search.json.
`--quant` skips the search: the student is exported in those QuantSpecs (and fp32) and measured.
A finetune stage already in --out with the same parameters is reused (so is every other stage).
Needs ../shared/data/banking77 (not part of the project); exits 0 with a note when it is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
RESULTS = Path(__file__).parent / "results" / "banking77_search.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/perf-banking77-search")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train.csv and test.csv")
    parser.add_argument("--teacher-model", default="builtin:all-MiniLM-L6-v2")
    parser.add_argument("--budget", type=float, default=1.0, help="validation points the search may lose")
    parser.add_argument("--budget-from", choices=("teacher", "student"), default="student",
                        help="what the budget counts from (the issue: within 1 point of the fp32 student)")
    parser.add_argument("--objective", choices=("latency", "size"), default="latency")
    parser.add_argument("--search-quant", nargs="+", default=["int8", "int4"], help="QuantSpecs the search tries")
    parser.add_argument("--qat-epochs", type=float, default=0.0,
                        help="quantization-aware training for specs over budget")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 5], help="teacher layers the student keeps")
    parser.add_argument("--quant", nargs="+", help="no search: export these QuantSpecs of the student")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.data / "train.csv").is_file():
        print(f"skipped: {args.data} is absent (BANKING77 is not part of the project)")
        return 0

    from banking77 import base_recipe  # perf/banking77.py, beside this script

    from edgekd.manifest import read_manifest
    from edgekd.pipeline import run
    from edgekd.recipe import recipe_from_dict

    out = Path(args.out)
    recipe = recipe_from_dict(base_recipe(args.data, args.teacher_model) | {
        "student": {"layers": args.layers, "augment": 0, "vocab_margin": 3000},
        "compress": {"quant": args.quant} if args.quant else {
            "quant": [], "budget": args.budget, "objective": args.objective, "recovery_epochs": 2,
            "search_quant": args.search_quant, "qat_epochs": args.qat_epochs, "budget_from": args.budget_from},
        "targets": [{"target": "android", "format": "executorch"}],
        "bench": {"iterations": 100, "warmup": 10},
    })
    summary = run(recipe, out)
    search = read_manifest(out / "compress")["metrics"].get("search")
    if search:
        print_search(search)
    print(f"\n{'artifact':<48} {'size MB':>8} {'test acc %':>10} {'p50 ms':>7}")
    for v in summary["variants"]:
        print(f"{v['name']:<48} {v['size_bytes'] / 1e6:8.2f} {100 * (v['accuracy'] or 0):10.2f} "
              f"{(v['latency_ms'] or {}).get('p50', float('nan')):7.2f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "command": "python perf/banking77_search.py " + " ".join(sys.argv[1:]),
        "machine": summary["machine"], "search": search,
        "artifacts": [{k: v.get(k) for k in ("name", "role", "quant", "size_bytes", "accuracy", "macro_f1")}
                      | {"latency_p50_ms": (v["latency_ms"] or {}).get("p50")} for v in summary["variants"]],
        "ratios": summary["ratios"], "stages": summary["stages"]}, indent=2) + "\n")
    print(f"report: {out / 'report.html'}; recorded {args.results}")
    return 0


def print_search(search: dict) -> None:
    measured = {row["name"]: row for row in search["measured"]}
    fp32 = measured.get("fp32", {}).get("latency_p50_ms")
    print(f"\nteacher validation accuracy {100 * search['teacher_accuracy']:.2f} %, budget {search['budget_points']} "
          f"points below the {search['budget_from']} ({100 * search['reference_accuracy']:.2f} %), "
          f"objective {search['objective']}")
    print(f"{'candidate':<34} {'val acc %':>9} {'drop':>6} {'size MB':>8} {'p50 ms':>7} {'vs fp32':>7}  front")
    for row in search["candidates"]:
        timed = measured.get(row["name"], {})
        p50 = timed.get("latency_p50_ms")
        print(f"{row['name']:<34} {100 * row['accuracy']:9.2f} {row['drop_points']:6.2f} "
              f"{(timed.get('size_bytes') or 0) / 1e6:8.2f} {p50 or float('nan'):7.2f} "
              f"{(fp32 / p50 if fp32 and p50 else float('nan')):6.2f}x  "
              f"{'*' if row['name'] in search['front'] else ''}{' chosen' if row['name'] == search['chosen'] else ''}")
    print(f"chosen: {search['explanation']}")


if __name__ == "__main__":
    raise SystemExit(main())
