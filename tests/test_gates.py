"""The export gate: correctness against the artifact's own reference, the change against fp32 judged by the
accuracy budget (never by a few texts)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from edgekd.errors import GateError
from edgekd.manifest import verify_stage

from conftest import REPORT_LINES, tiny_student_stage


def test_a_correct_int8_export_passes_against_its_pt2e_program(bench_exports):
    from edgekd.targets.executorch import XNNPACK_TOLERANCE

    manifest = verify_stage(bench_exports["et-int8"], "export")
    metrics = manifest["metrics"]
    parity = metrics["parity"]
    assert parity["reference"].startswith("the PT2E/torchao program") and parity["tolerance"] == XNNPACK_TOLERANCE
    assert parity["max_scaled_diff"] <= XNNPACK_TOLERANCE
    # The change against fp32 is measured on the whole splits, and its figures are the stage's own.
    change = metrics["vs_fp32"]
    assert change["validation"]["texts"] == 30 and change["test"]["texts"] == 30 and change["budget_points"] == 2.0
    predictions, labels = np.array(manifest["test_predictions"]), np.array(manifest["test_labels"])
    assert change["test"]["accuracy"] == pytest.approx(float((predictions == labels).mean()))
    assert change["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert change["test"]["top1_agreement"] == metrics["test"]["agreement"]
    low, high = change["test"]["delta_ci95_points"]
    assert low <= change["test"]["delta_points"] <= high


def test_fp32_artifacts_are_still_proven_against_pytorch(bench_exports):
    parity = verify_stage(bench_exports["et-fp32"], "export")["metrics"]["parity"]
    assert parity["reference"] == "the fp32 PyTorch model" and parity["max_abs_diff"] <= 1e-4


def test_a_broken_executorch_export_fails_its_own_reference(tmp_path, small_data, monkeypatch):
    """Plant wrong weights in the program that is lowered (not in the reference): the gate must catch it."""
    import torch
    from executorch import exir

    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    stage_dir, _, _, dataset = tiny_student_stage(tmp_path, small_data, length=16, name="broken")
    real = exir.to_edge_transform_and_lower

    def lower_corrupted(program, **kwargs):
        program = copy.deepcopy(program)
        with torch.no_grad():
            for tensor in list(program.state_dict.values()) + list(program.constants.values()):
                if tensor.is_floating_point() and tensor.ndim == 1:   # biases and norms: wrong weights
                    tensor.add_(0.5)
        return real(program, **kwargs)

    monkeypatch.setattr(exir, "to_edge_transform_and_lower", lower_corrupted)
    out = tmp_path / "export" / "student-int8"
    with pytest.raises(GateError, match="fails parity with the PT2E/torchao program.*the export is broken") as error:
        export_artifact(stage_dir, "distill", get_format("android", "executorch"), get_spec("int8"), dataset, out,
                        role="compressed", model_name="tiny-student")
    REPORT_LINES.append(f"planted broken int8 .pte: {error.value}")
    assert not out.exists() and not list(out.parent.iterdir())   # nothing written, no temporary left


def _logits(correct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Three-class logits predicting the label where `correct`, the next class elsewhere."""
    predicted = np.where(correct, labels, (labels + 1) % 3)
    return np.eye(3, dtype=np.float32)[predicted] * 4.0


@pytest.mark.parametrize("flipped,budget,fails", [
    (3, 0.0, False),     # the demo's failure: 3 texts of 200 is noise, even with no budget at all
    (8, 2.0, False),     # 4 points lost on 200 texts: its interval reaches back inside 2 points
    (40, 2.0, True),     # 20 points: a broken quantization, whatever the noise
])
def test_the_budget_judges_the_interval_of_the_loss_not_a_count(flipped, budget, fails):
    from edgekd.targets.export import _change, _check_budget

    labels = np.arange(200) % 3
    fp32 = _logits(np.ones(200, bool), labels)
    artifact = _logits(np.arange(200) >= flipped, labels)
    change = {"validation": _change(artifact, fp32, labels), "budget_points": budget}
    assert change["validation"]["delta_points"] == pytest.approx(-100 * flipped / 200)
    if fails:
        with pytest.raises(GateError, match=r"loses 20\.0 points .* beyond the budget of 2 points"):
            _check_budget(change, "x.pte")
    else:
        _check_budget(change, "x.pte")


def test_litert_int4_has_no_reference_and_is_judged_by_its_change(tmp_path, small_data):
    """LiteRT's CPU kernels without XNNPACK do not compute blockwise int4: no reference is claimed, the change
    against fp32 is still measured and judged."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    stage_dir, _, _, dataset = tiny_student_stage(tmp_path, small_data, length=16, name="litert-int4")
    metrics = export_artifact(stage_dir, "distill", get_format("android", "litert"), get_spec("int4"), dataset,
                              tmp_path / "int4", role="compressed", model_name="tiny-student")
    assert metrics["parity"]["checked"] == "none" and "judged by its change against fp32" in metrics["parity"]["reason"]
    assert metrics["vs_fp32"]["validation"]["texts"] == 30 and metrics["test"]["n"] == 30
