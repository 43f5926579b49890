"""Out-of-fold soft labels (teacher.cross_fit) on the demo: the int8 student against its teacher, per seed.

    python perf/cross_fit.py [--folds 5] [--seeds 0 1 2] [--out runs/perf-cross-fit]

The built-in demo recipe (finsent, MiniLM teacher, the 3-layer trimmed student, augment 4) with each seed:
the teacher is fine-tuned once, then the student is distilled twice from it, its soft labels from the final
teacher alone (cross_fit 0, the demo today) and from `--folds` fold teachers (cross_fit K). Each student is
exported int8 for android/executorch (the demo's target) and its `.pte` measured in the ExecuTorch runtime on
the validation and test splits together (the export's `vs_fp32`), against the teacher on the same texts.
Records perf/results/cross_fit.json row by row (the run and each seed's figures, the paired differences
between the arms, their mean and standard error) and prints a table. Stages done in --out are reused.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cross_fit.json"


def _pooled(metrics: dict, key: str = "accuracy") -> tuple[float, int]:
    """(accuracy on validation + test together, texts) from per-split {accuracy, n|texts} entries."""
    splits = [metrics["validation"], metrics["test"]]
    sizes = [s.get("n", s.get("texts")) for s in splits]
    return sum(s[key] * n for s, n in zip(splits, sizes)) / sum(sizes), sum(sizes)


def run_seed(seed: int, folds: int, out: Path) -> dict:
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.recipe import builtin_recipe, recipe_from_dict
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    base = builtin_recipe().to_dict()
    base["seed"] = seed
    root = out / f"seed{seed}"
    started = time.time()
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    teacher = finetune(recipe, dataset, root / "finetune")
    teacher_s = time.time() - started
    teacher_acc, texts = _pooled(teacher)
    row = {"seed": seed, "texts": texts, "teacher_accuracy": teacher_acc, "teacher_s": round(teacher_s, 1), "arms": {}}
    for k in (0, folds):
        arm = recipe_from_dict({**base, "teacher": {**base["teacher"], "cross_fit": k}})
        started = time.time()
        metrics = distill(arm, dataset, root / "finetune", root / f"distill-cf{k}", root / ".cache")
        distill_s = time.time() - started
        export = export_artifact(root / f"distill-cf{k}", "distill", get_format("android", "executorch"),
                                 get_spec("int8"), dataset, root / f"export-cf{k}", "student", f"finsent-cf{k}")
        int8, _ = _pooled(export["vs_fp32"])
        fp32, _ = _pooled(export["vs_fp32"], "fp32_accuracy")
        row["arms"][f"cross_fit={k}"] = {
            "int8_accuracy": int8, "fp32_accuracy": fp32,
            "int8_minus_teacher_points": round(100 * (int8 - teacher_acc), 2),
            "distill_s": round(distill_s, 1), "transfer_set": metrics["transfer_set"]}
    plain, cross = row["arms"]["cross_fit=0"], row["arms"][f"cross_fit={folds}"]
    row["cross_fit_minus_plain_points"] = round(100 * (cross["int8_accuracy"] - plain["int8_accuracy"]), 2)
    return row


def summarize(rows: list[dict], folds: int) -> dict:
    def mean_se(values):
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        return {"mean": round(statistics.mean(values), 2), "se": None if se is None else round(se, 2)}

    out = {"cross_fit_minus_plain_points": mean_se([r["cross_fit_minus_plain_points"] for r in rows])}
    for k in (0, folds):
        out[f"cross_fit={k}: int8_minus_teacher_points"] = mean_se(
            [r["arms"][f"cross_fit={k}"]["int8_minus_teacher_points"] for r in rows])
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/perf-cross-fit")
    args = parser.parse_args(argv)
    import torch

    record = {"command": " ".join(["python perf/cross_fit.py", *argv]), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "folds": args.folds, "rows": []}
    for seed in args.seeds:
        row = run_seed(seed, args.folds, Path(args.out))
        record["rows"].append(row)
        record["summary"] = summarize(record["rows"], args.folds)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
        print(f"seed {seed}: teacher {100 * row['teacher_accuracy']:.2f} % on {row['texts']} texts", flush=True)
        for name, arm in row["arms"].items():
            cross = arm["transfer_set"].get("cross_fit") or {}
            print(f"  {name:<12} int8 {100 * arm['int8_accuracy']:.2f} % ({arm['int8_minus_teacher_points']:+.2f} "
                  f"points), fp32 {100 * arm['fp32_accuracy']:.2f} %, distill {arm['distill_s']:.0f} s, soft-label "
                  f"confidence {cross.get('teacher_confidence', arm['transfer_set']['teacher_confidence']):.3f}",
                  flush=True)
    print(json.dumps(record["summary"], indent=2))
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
