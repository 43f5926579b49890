"""End to end: `edgekd run` on a reduced recipe; every stage directory, checksum and reported number."""
from __future__ import annotations

import json

import yaml

from edgekd.cli import main
from edgekd.manifest import verify_stage

STAGES = ("finetune", "distill", "compress", "bench")


def test_run_reduced_recipe(tmp_path, tiny_recipe_dict, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)

    for stage in STAGES:
        assert verify_stage(out / stage, stage)["stage"] == stage
    exports = sorted(p.name for p in (out / "export").iterdir())
    assert exports == ["student-fp32-android-executorch", "student-int8-android-executorch",
                       "teacher-fp32-android-executorch"]
    by_name = {v["name"]: v for v in printed["variants"]}
    for name in exports:
        manifest = verify_stage(out / "export" / name, "export")
        artifact = out / "export" / name / manifest["artifact"]
        variant = by_name[name]
        assert variant["size_bytes"] == artifact.stat().st_size
        assert variant["latency_ms"]["p50"] > 0 and variant["latency_ms"]["p90"] >= variant["latency_ms"]["p50"]
        assert 0.0 <= variant["accuracy"] <= 1.0 and 0.0 <= variant["macro_f1"] <= 1.0
        assert variant["params"] > 0
        assert manifest["metrics"]["parity"]["texts"] == 30
    teacher, student = by_name["teacher-fp32-android-executorch"], by_name["student-fp32-android-executorch"]
    assert teacher["agreement"] == 1.0 and 0.0 <= student["agreement"] <= 1.0
    assert all(0.0 <= v["ece"] <= 1.0 for v in printed["variants"])
    assert student["params"] < teacher["params"]          # layers cut and vocabulary trimmed
    assert by_name["student-int8-android-executorch"]["size_bytes"] < student["size_bytes"]
    assert (out / "export" / "student-fp32-android-executorch").joinpath("tokenizer.json").is_file()
    assert {v["role"] for v in printed["variants"]} == {"teacher", "student", "compressed"}
    report = (out / "report.md").read_text()
    assert "Teacher (fine-tuned)" in report and "Student, int8" in report
    assert (out / "report.html").is_file() and (out / "plots" / "size.png").is_file()

    # A rerun finds every stage done and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("manifest.json")}
    assert main(["run", str(recipe), "--out", str(out), "--json"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("manifest.json")}


def test_report_json_of_existing_run_matches_files(tmp_path, tiny_recipe_dict, capsys):
    """`edgekd report RUN --json` re-reads a run; a tampered artifact is refused with one line."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict | {"compress": {"quant": []}, "bench": {"iterations": 2}}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["variants"]) == 2
    pte = next((out / "export" / "student-fp32-android-executorch").glob("*.pte"))
    pte.write_bytes(pte.read_bytes()[:-10])
    assert main(["report", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
