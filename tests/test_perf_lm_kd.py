"""perf/lm_kd_vs_ce.py --resume: which rows of an earlier results file a rerun keeps."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("lm_kd_vs_ce", Path(__file__).parents[1] / "perf" / "lm_kd_vs_ce.py")
lm_kd_vs_ce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_kd_vs_ce)

ARMS = {"distilled (alpha 0.5)": 0.5, "no teacher (alpha 0)": 0.0}
TEACHER = {"key": "df09f39b99dd5081", "test_perplexity": 1.24}


def results(tmp_path, rows, recipe=None):
    file = tmp_path / "results.json"
    file.write_text(json.dumps({"recipe": recipe or {"seed": 0}, "student_changes": {},
                                "distilled_arm_changes": {"unlabeled": "train.csv960"}, "rows": rows}))
    return file


def row(seed, arm, steps=240, teacher=TEACHER):
    return {"seed": seed, "arm": arm, "alpha": ARMS[arm], "steps": steps, **({"teacher": teacher} if teacher else {})}


def kept(file, seeds=(0, 1, 2), steps=240, teacher=TEACHER):
    return lm_kd_vs_ce._earlier_rows(file, {"seed": 0}, {}, {"unlabeled": "train.csv960"}, steps, ARMS,
                                     list(seeds), teacher)


def test_complete_seeds_of_the_same_configuration_are_kept(tmp_path, capsys):
    kd, ce = ARMS
    file = results(tmp_path, [row(0, kd, teacher=None), row(0, ce, teacher=None), row(1, kd), row(3, kd), row(3, ce)])
    assert [(r["seed"], r["arm"]) for r in kept(file)] == [(0, kd), (0, ce)]  # seed 1 lacks an arm, 3 not asked
    assert "its teacher was not recorded" in capsys.readouterr().out
    assert kept(tmp_path / "none.json") == []


@pytest.mark.parametrize("change, message", [
    ({"recipe": {"seed": 5}}, "holds another recipe"),
    ({"steps": 120}, "ran 240 steps, not 120"),
    ({"teacher": {"key": "another", "test_perplexity": 1.3}}, "used teacher df09f39b99dd5081, not another"),
])
def test_another_configuration_or_teacher_is_refused(tmp_path, change, message):
    kd, ce = ARMS
    file = results(tmp_path, [row(0, kd), row(0, ce)], recipe=change.get("recipe"))
    with pytest.raises(SystemExit, match=message):
        kept(file, steps=change.get("steps", 240), teacher=change.get("teacher", TEACHER))
