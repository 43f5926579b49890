"""export_variants with workers: exports in spawned processes of their own, gate failures recorded as in one
process, a dead export process stopped in one line."""
import json
import os
from functools import partial

import pytest

from edgekd.errors import ExportError
from edgekd.pipeline import export_variants

import fake_exports


def test_two_workers_run_the_exports_in_other_processes_at_once_and_keep_a_gate_failure(tmp_path):
    marks = {name: tmp_path / f"{name}.txt" for name in ("teacher", "student")}
    outcomes = export_variants(tmp_path, {
        "teacher": partial(fake_exports.write_marker, str(marks["teacher"]), 3.0),
        "student": partial(fake_exports.write_marker, str(marks["student"]), 3.0),
        "int4": partial(fake_exports.refuse, "int4"),
    }, workers=2)
    assert [o["status"] for o in outcomes.values()] == ["exported", "exported", "failed"]
    assert "on purpose" in outcomes["int4"]["reason"]
    assert json.loads((tmp_path / "plan.json").read_text())["variants"] == outcomes
    runs = [[float(x) for x in p.read_text().split()] for p in marks.values()]
    pids = {int(pid) for pid, _, _ in runs}
    assert os.getpid() not in pids and len(pids) == 2  # each in a process of its own
    assert max(start for _, start, _ in runs) < min(end for _, _, end in runs)  # side by side


def test_one_worker_or_the_environment_setting_keeps_them_in_this_process(tmp_path, monkeypatch):
    mark = tmp_path / "m.txt"
    monkeypatch.setenv("EDGEKD_EXPORT_WORKERS", "1")
    export_variants(tmp_path, {"a": partial(fake_exports.write_marker, str(mark)),
                               "b": partial(fake_exports.refuse, "b")}, workers=2)
    assert int(mark.read_text().split()[0]) == os.getpid()


def test_a_dead_export_process_is_one_line_that_names_the_fix(tmp_path):
    with pytest.raises(ExportError, match="EDGEKD_EXPORT_WORKERS=1") as caught:
        export_variants(tmp_path, {"a": fake_exports.die, "b": partial(fake_exports.refuse, "b")}, workers=2)
    assert "\n" not in str(caught.value) and "a" in str(caught.value)


def test_a_bad_workers_setting_is_one_line_before_any_export(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_EXPORT_WORKERS", "two")
    with pytest.raises(ExportError, match="whole number"):
        export_variants(tmp_path, {"a": partial(fake_exports.write_marker, str(tmp_path / "m.txt"))}, workers=2)
    assert not (tmp_path / "m.txt").exists() and not (tmp_path / "plan.json").exists()
