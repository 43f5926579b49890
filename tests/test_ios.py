"""iOS target: Core ML .mlpackage and ExecuTorch + Core ML .pte, on tiny random BERTs.

Off macOS nothing can run Core ML, so these tests check what export checks there: the package
read back from disk (interface, op types, weight storage) and the delegation of the .pte.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("coremltools")

from edgekd.compress.quant import get_spec
from edgekd.data import Dataset, Split
from edgekd.errors import ExportError, RecipeError
from edgekd.manifest import read_manifest, verify_stage, write_stage
from edgekd.targets import FORMATS, RuntimeUnavailable, graph, ios  # ios registers ios/coreml, ios/executorch-coreml
from edgekd.targets.export import export_artifact

from conftest import make_rows

MAX_LENGTH = 16
ON_MAC = sys.platform == "darwin"
# spec -> (deployment target, how its weights must be stored, the op that decompresses them)
SPECS = {
    "fp32": ("iOS16", "fp32", None),
    "fp16": ("iOS17", "fp16", None),
    "int8-weights": ("iOS17", "int8", "constexpr_affine_dequantize"),
    "palettize4": ("iOS16", "lut4", "constexpr_lut_to_dense"),
    "int4-weights": ("iOS18", "int4", "constexpr_blockwise_shift_scale"),
}


@pytest.fixture(scope="module")
def tiny_model():
    """2 layers x 64: the Linear weights (64 x 64 and up) pass coremltools' 2048-element threshold."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory) -> dict[str, dict]:
    """Every Core ML spec converted once (a few seconds each): spec -> structural summary."""
    root = tmp_path_factory.mktemp("coreml")
    return {name: ios.convert_coreml(tiny_model, get_spec(name), MAX_LENGTH, [], root / f"{name}.mlpackage",
                                     deployment_target=target)
            for name, (target, _, _) in SPECS.items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_every_coreml_spec_converts_and_passes_the_structural_check(converted, name):
    target, kind, op = SPECS[name]
    summary = converted[name]
    assert summary["inputs"] == [{"name": n, "dtype": "int32", "shape": [1, MAX_LENGTH]}
                                 for n in ("input_ids", "attention_mask")]
    assert summary["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, 3]}]
    assert summary["runs_on"] == f"{target}+"
    weights = summary["weights"]
    total = sum(w["params"] for w in weights.values())
    assert weights[kind]["params"] / total > 0.9, weights
    if op:  # compressed: the big weights are decompressed by this op; the small ones stay fp16
        assert summary["op_types"][op] == weights[kind]["tensors"]
        assert set(weights) == {kind, "fp16"}
    else:
        assert set(weights) == {kind}
        assert not any(t.startswith("constexpr") for t in summary["op_types"])
    assert {"matmul", "layer_norm", "softmax", "gather"} <= set(summary["op_types"])
    assert summary["nonfinite_constants"] == []
    assert any(kind in line for line in summary["checks"])


def test_compressed_packages_are_smaller(converted):
    size = {name: converted[name]["size_bytes"] for name in SPECS}
    assert size["palettize4"] < size["int8-weights"] < size["fp16"] < size["fp32"]
    assert size["int4-weights"] < size["int8-weights"]


def test_int4_below_ios18_is_refused_in_one_line(tiny_model, tmp_path):
    with pytest.raises(RecipeError) as err:
        ios.convert_coreml(tiny_model, get_spec("int4-weights"), MAX_LENGTH, [], tmp_path / "m.mlpackage",
                           deployment_target="iOS16")
    message = str(err.value)
    assert "\n" not in message and "iOS18" in message and "deployment_target" in message
    assert not (tmp_path / "m.mlpackage").exists()


def test_structural_check_catches_a_mask_that_float16_cannot_hold(tiny_model, tmp_path, monkeypatch):
    """float32's min becomes -inf in float16 and 0 * -inf = NaN: the check must refuse the package."""
    monkeypatch.setattr(graph, "MASK_VALUE", torch.finfo(torch.float32).min)
    with pytest.raises(ExportError, match="inf/NaN"):
        ios.convert_coreml(tiny_model, get_spec("fp16"), MAX_LENGTH, [], tmp_path / "m.mlpackage")


@pytest.mark.parametrize("fmt", ["ios/coreml", "ios/executorch-coreml"])
def test_options_are_checked(fmt):
    ios_format = FORMATS.get(fmt)
    assert ios_format.resolve_options(None) == {"deployment_target": "iOS17"}
    assert ios_format.resolve_options({"deployment_target": "iOS18"}) == {"deployment_target": "iOS18"}
    with pytest.raises(RecipeError, match="did you mean 'deployment_target'"):
        ios_format.resolve_options({"deployment_targt": "iOS18"})
    with pytest.raises(RecipeError, match="iOS16, iOS17, iOS18") as err:
        ios_format.resolve_options({"deployment_target": "iOS15"})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt, spec", [("ios/coreml", "int8-static"), ("ios/executorch-coreml", "palettize4")])
def test_a_spec_the_format_cannot_realize_names_the_supported_ones(fmt, spec, tmp_path):
    ios_format = FORMATS.get(fmt)
    with pytest.raises(ExportError) as err:
        export_artifact(tmp_path / "none", "finetune", ios_format, get_spec(spec), None, tmp_path / "out",
                        "student", "tiny")
    assert f"cannot realize quantization '{spec}'" in str(err.value)
    assert ", ".join(ios_format.specs) in str(err.value)


@pytest.mark.skipif(ON_MAC, reason="Core ML runs on macOS")
def test_coreml_runner_says_why_it_cannot_run_here(tmp_path):
    with pytest.raises(RuntimeUnavailable, match="Core ML runs only on macOS"):
        ios.CoreMLRunner(tmp_path / "any.mlpackage")


# ------------------------------------------------------------------ export_artifact end to end

@pytest.fixture(scope="module")
def model_stage(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher as a finetune stage directory, as export reads it."""
    out = tmp_path_factory.mktemp("stage") / "finetune"
    with write_stage(out, "finetune", {}) as stage:
        for file in Path(tiny_teacher_dir).iterdir():
            shutil.copyfile(file, stage.path / file.name)
        stage.extra["max_length"] = MAX_LENGTH
    return out


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    def split(n, seed):
        rows = make_rows(n, seed)
        return Split([r["text"] for r in rows], [r["label"] for r in rows])

    return Dataset(split(12, 1), split(10, 2), split(10, 3), ["negative", "neutral", "positive"])


@pytest.mark.parametrize("fmt, suffix", [("ios/coreml", ".mlpackage"), ("ios/executorch-coreml", ".pte")])
def test_export_artifact_records_structural_parity(model_stage, dataset, tmp_path, fmt, suffix):
    if fmt == "ios/executorch-coreml":
        pytest.importorskip("executorch")
    ios_format = FORMATS.get(fmt)
    out = tmp_path / "export"
    args = (model_stage, "finetune", ios_format, get_spec("fp16"), dataset, out, "teacher", "tiny")
    metrics = export_artifact(*args, options={"deployment_target": "iOS17"})

    manifest = verify_stage(out, "export")  # every file of the package is listed and checksummed
    artifact = out / manifest["artifact"]
    assert manifest["artifact"] == f"tiny_coreml_fp16{suffix}"
    assert manifest["size_bytes"] == sum(p.stat().st_size for p in [artifact, *artifact.rglob("*")] if p.is_file())
    if suffix == ".mlpackage":
        assert artifact.is_dir() and f"{manifest['artifact']}/Manifest.json" in manifest["files"]
        assert manifest["delegation"]["runs_on"] == "iOS17+"
        assert set(manifest["delegation"]["weights"]) == {"fp16"}
    else:
        assert manifest["delegation"]["backend"] == "CoreMLBackend"
        assert manifest["delegation"]["non_delegated_nodes"] == 0
        assert manifest["delegation"]["delegate_calls"] == 1
    assert not list(tmp_path.glob(".export.tmp-*"))  # written in a temporary sibling, then renamed
    if metrics["parity"]["checked"] == "numerical":  # on a Mac whose runtime has Core ML
        assert ON_MAC and metrics["test"] is not None
        return
    assert metrics["parity"]["checked"] == "structural"
    assert "Core ML runs only on" in metrics["parity"]["reason"]
    assert metrics["parity"]["checks"] == manifest["delegation"]["checks"]
    assert metrics["test"] is None and "not measured" in metrics["test_note"]
    assert manifest["test_predictions"] is None and metrics["load_ms"] is None
    # a rerun with the same inputs is recognised as done
    assert export_artifact(*args, options={"deployment_target": "iOS17"}) == read_manifest(out)["metrics"]
