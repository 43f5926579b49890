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
        # every validation text at its own length, and 20 of them padded to max_length (dynamic length, the default)
        assert manifest["dynamic_length"] is True and manifest["metrics"]["parity"]["texts"] == 30 + 20
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


def test_a_failed_variant_is_reported_and_the_others_kept(tmp_path, tiny_recipe_dict, capsys, monkeypatch):
    """One variant fails its gate: the others are exported, benched and reported, the failed one is in the
    report with its reason, and `edgekd run` exits 1 with one line. Then the report takes exactly this run's
    variants: not a stale variant of another recipe, not a killed export's temporary directory."""
    import shutil

    from edgekd.errors import GateError
    from edgekd.targets import export

    def planted(change, name):  # stands for a real budget failure, which a tiny model cannot produce on demand
        raise GateError(f"{name} loses 30.0 points of validation accuracy (planted); nothing written")

    monkeypatch.setattr(export, "_check_budget", planted)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict | {"bench": {"iterations": 2}}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--json"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "student-int8-android-executorch" in errors[0] and "report" in errors[0]
    kept = ["student-fp32-android-executorch", "teacher-fp32-android-executorch"]
    assert sorted(p.name for p in (out / "export").iterdir()) == kept   # nothing of the failed one on disk
    summary = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in summary["variants"]] == kept[::-1]
    assert all(v["latency_ms"]["p50"] > 0 for v in summary["variants"])  # benched
    assert summary["failed"] == [{"name": "student-int8-android-executorch",
                                  "reason": "tiny-student_xnnpack_int8.pte loses 30.0 points of validation accuracy "
                                            "(planted); nothing written"}]
    report = (out / "report.md").read_text()
    assert "## Failed variants" in report and "(planted)" in report
    assert json.loads((out / "plan.json").read_text())["variants"]["student-int8-android-executorch"]["status"] \
        == "failed"

    # A stale variant of an earlier recipe (a whole, verified stage directory) and a killed export's temporary.
    shutil.copytree(out / "export" / kept[0], out / "export" / "student-int4-android-executorch")
    (out / "export" / ".student-int8-android-executorch.tmp-123").mkdir()
    (out / "export" / ".student-int8-android-executorch.tmp-123" / "half.pte").write_bytes(b"\0" * 10)
    assert main(["report", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(v["name"] for v in printed["variants"]) == kept
    assert [f["name"] for f in printed["failed"]] == ["student-int8-android-executorch"]
    # Without a plan (variants made by `edgekd export`), every stage directory is taken, temporaries never.
    (out / "plan.json").unlink()
    assert main(["report", str(out), "--json"]) == 0
    names = sorted(v["name"] for v in json.loads(capsys.readouterr().out)["variants"])
    assert names == [kept[0], "student-int4-android-executorch", kept[1]]
