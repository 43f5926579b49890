"""Student-side levers on the demo: each arm's int8 student against the same teacher, per seed.

    python perf/student_levers.py --arm hidden student.hidden_weight=1 --arm long student.epochs=8 \
        [--seeds 0 1 2] [--out runs/perf-cross-fit] [--results student_levers.json]

The built-in demo recipe (finsent, MiniLM teacher, the 3-layer trimmed student, augment 4) with each seed:
the teacher is fine-tuned once (reused from --out when done there, e.g. perf/cross_fit.py's run), then the
student is distilled with the recipe as it is (arm "demo") and with each --arm's changes (dotted recipe keys,
values read as YAML). Each student is exported int8 for android/executorch (the demo's target) and its `.pte`
measured in the ExecuTorch runtime on the validation and test splits together (the export's `vs_fp32`),
against the teacher on the same texts. Records perf/results/<--results> after every seed (each arm's figures,
its paired difference from "demo", mean and standard error over the seeds) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

RESULTS_DIR = Path(__file__).parent / "results"


def _pooled(metrics: dict, key: str = "accuracy") -> tuple[float, int]:
    """(accuracy on validation + test together, texts) from per-split {accuracy, n|texts} entries."""
    splits = [metrics["validation"], metrics["test"]]
    sizes = [s.get("n", s.get("texts")) for s in splits]
    return sum(s[key] * n for s, n in zip(splits, sizes)) / sum(sizes), sum(sizes)


def with_changes(base: dict, changes: dict[str, object]) -> dict:
    recipe = copy.deepcopy(base)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = recipe
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return recipe


def run_seed(seed: int, arms: dict[str, dict], out: Path) -> dict:
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.recipe import builtin_recipe, recipe_from_dict
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    base = builtin_recipe().to_dict()
    base["seed"] = seed
    root = out / f"seed{seed}"
    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    teacher = finetune(recipe, dataset, root / "finetune")
    teacher_acc, texts = _pooled(teacher)
    row = {"seed": seed, "texts": texts, "teacher_accuracy": teacher_acc, "arms": {}}
    for name, changes in arms.items():
        arm = recipe_from_dict(with_changes(base, changes))
        # "demo" shares perf/cross_fit.py's folder for the unchanged recipe, so its stage is reused.
        folder = "cf0" if name == "demo" else name
        started = time.time()
        distill(arm, dataset, root / "finetune", root / f"distill-{folder}", root / ".cache")
        distill_s = time.time() - started
        export = export_artifact(root / f"distill-{folder}", "distill", get_format("android", "executorch"),
                                 get_spec("int8"), dataset, root / f"export-{folder}", "student", f"finsent-{folder}")
        int8, _ = _pooled(export["vs_fp32"])
        size = read_manifest(root / f"export-{folder}")["size_bytes"]
        fp32, _ = _pooled(export["vs_fp32"], "fp32_accuracy")
        row["arms"][name] = {
            "changes": changes, "int8_accuracy": int8, "fp32_accuracy": fp32, "size_bytes": size,
            "int8_minus_teacher_points": round(100 * (int8 - teacher_acc), 2),
            "distill_s": round(distill_s, 1)}
        print(f"seed {seed} {name:<14} int8 {100 * int8:.2f} % ({100 * (int8 - teacher_acc):+.2f} points from the "
              f"teacher's {100 * teacher_acc:.2f}), {size / 1e6:.2f} MB, distill {distill_s:.0f} s",
              flush=True)
    for arm in row["arms"].values():
        arm["minus_demo_points"] = round(100 * (arm["int8_accuracy"] - row["arms"]["demo"]["int8_accuracy"]), 2)
    return row


def summarize(rows: list[dict]) -> dict:
    def mean_se(values):
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        return {"mean": round(statistics.mean(values), 2), "se": None if se is None else round(se, 2)}

    return {name: {"int8_minus_teacher_points": mean_se([r["arms"][name]["int8_minus_teacher_points"] for r in rows]),
                   "minus_demo_points": mean_se([r["arms"][name]["minus_demo_points"] for r in rows])}
            for name in rows[0]["arms"]}


def parse_arms(pairs: list[list[str]]) -> dict[str, dict]:
    arms = {"demo": {}}
    for name, *changes in pairs:
        if name in arms:
            raise SystemExit(f"arm '{name}' given twice")
        arms[name] = {}
        for change in changes:
            key, sep, value = change.partition("=")
            if not sep:
                raise SystemExit(f"arm '{name}': '{change}' is not key=value")
            arms[name][key] = yaml.safe_load(value)
    return arms


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="an arm: its name, then the recipe changes (e.g. student.hidden_weight=1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/perf-cross-fit")
    parser.add_argument("--results", default="student_levers.json")
    args = parser.parse_args(argv)
    arms = parse_arms(args.arm)
    import torch

    record = {"command": " ".join(["python perf/student_levers.py", *argv]), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "arms": arms, "rows": []}
    results = RESULTS_DIR / args.results
    for seed in args.seeds:
        record["rows"].append(run_seed(seed, arms, Path(args.out)))
        record["summary"] = summarize(record["rows"])
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'arm':<14} {'int8 - teacher (points)':>24} {'arm - demo (points)':>20}")
    for name, s in record["summary"].items():
        a, b = s["int8_minus_teacher_points"], s["minus_demo_points"]
        print(f"{name:<14} {a['mean']:>+17.2f} ± {a['se'] if a['se'] is not None else '-':<5}"
              f"{b['mean']:>+13.2f} ± {b['se'] if b['se'] is not None else '-'}")
    print(f"recorded in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
