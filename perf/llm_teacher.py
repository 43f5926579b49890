"""A decoder LLM as the classifier's teacher (issue 15, lever 2) against the demo's MiniLM teacher, per seed.

    python perf/llm_teacher.py [--seeds 0] [--out runs/perf-cross-fit] [--teacher-epochs 4]

The built-in demo recipe (finsent) twice per seed: as it is (MiniLM-L6 teacher, the student cut from its layers
[1, 3, 5]) and with `teacher.model: builtin:SmolLM2-135M-Instruct` (fine-tuned as a sequence classifier) teaching
`student.model: builtin:all-MiniLM-L6-v2` cut to the same layers, from the class logits alone (the tokenizers
differ), the transfer set augmented by dropping words (SmolLM2 has no [MASK]). The MiniLM arm's stages are
perf/cross_fit.py's and perf/student_levers.py's "demo" arm in the same --out, reused when done. Each student is
exported int8 for android/executorch and its `.pte` measured in the ExecuTorch runtime on validation and test
together, against its own teacher on the same texts. Records perf/results/llm_teacher.json after every seed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from student_levers import _pooled, with_changes

RESULTS = Path(__file__).parent / "results" / "llm_teacher.json"
LLM = "builtin:SmolLM2-135M-Instruct"


def run_arm(base: dict, root: Path, name: str, folder: str) -> dict:
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.distill.finetune import finetune
    from edgekd.manifest import read_manifest
    from edgekd.recipe import recipe_from_dict
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    recipe = recipe_from_dict(base)
    dataset = load_dataset(recipe)
    teacher_dir = root / ("finetune" if folder == "cf0" else f"finetune-{folder}")
    teacher = finetune(recipe, dataset, teacher_dir)
    finetune_s = read_manifest(teacher_dir)["wall_s"]
    teacher_acc, texts = _pooled(teacher)
    started = time.time()
    distill(recipe, dataset, teacher_dir, root / f"distill-{folder}", root / ".cache")
    distill_s = read_manifest(root / f"distill-{folder}")["wall_s"]
    export = export_artifact(root / f"distill-{folder}", "distill", get_format("android", "executorch"),
                             get_spec("int8"), dataset, root / f"export-{folder}", "student", f"finsent-{folder}")
    int8, _ = _pooled(export["vs_fp32"])
    arm = {"teacher": base["teacher"]["model"], "teacher_accuracy": teacher_acc, "texts": texts,
           "teacher_params": teacher["params"], "int8_accuracy": int8,
           "size_bytes": read_manifest(root / f"export-{folder}")["size_bytes"],
           "int8_minus_teacher_points": round(100 * (int8 - teacher_acc), 2),
           "finetune_s": finetune_s, "distill_s": distill_s, "distill_and_export_s": round(time.time() - started, 1)}
    print(f"  {name:<8} teacher {100 * teacher_acc:.2f} % ({teacher['params'] / 1e6:.0f} M params, fine-tune "
          f"{finetune_s:.0f} s), int8 student {100 * int8:.2f} % ({arm['int8_minus_teacher_points']:+.2f} points), "
          f"{arm['size_bytes'] / 1e6:.2f} MB, distill {distill_s:.0f} s", flush=True)
    return arm


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/perf-cross-fit")
    parser.add_argument("--teacher-epochs", type=float, default=None, help="the LLM teacher's epochs (default: "
                        "the demo teacher's)")
    args = parser.parse_args(argv)
    import torch

    from edgekd.distill.student import layers_to_keep
    from edgekd.models import BUILTIN_MODEL
    from edgekd.recipe import builtin_recipe

    record = {"command": " ".join(["python perf/llm_teacher.py", *argv]), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "rows": []}
    for seed in args.seeds:
        base = {**builtin_recipe().to_dict(), "seed": seed}
        cut = layers_to_keep(base["student"]["layers"], 6)  # the demo student's layers of the 6-layer MiniLM
        llm = with_changes(base, {"teacher.model": LLM, "student.model": BUILTIN_MODEL, "student.layers": cut,
                                  **({"teacher.epochs": args.teacher_epochs} if args.teacher_epochs else {})})
        root = Path(args.out) / f"seed{seed}"
        print(f"seed {seed}", flush=True)
        row = {"seed": seed, "minilm": run_arm(base, root, "MiniLM", "cf0"),
               "llm": run_arm(llm, root, "SmolLM2", "llm")}
        row["llm_minus_minilm_student_points"] = round(
            100 * (row["llm"]["int8_accuracy"] - row["minilm"]["int8_accuracy"]), 2)
        row["llm_minus_minilm_teacher_points"] = round(
            100 * (row["llm"]["teacher_accuracy"] - row["minilm"]["teacher_accuracy"]), 2)
        record["rows"].append(row)
        diffs = [r["llm_minus_minilm_student_points"] for r in record["rows"]]
        record["summary"] = {"llm_minus_minilm_student_points": {
            "mean": round(statistics.mean(diffs), 2),
            "se": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 2) if len(diffs) > 1 else None}}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
