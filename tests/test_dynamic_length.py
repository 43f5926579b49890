"""A dynamic sequence length for ExecuTorch XNNPACK: export option, parity at each text's own length, manifest."""
from __future__ import annotations

import pytest

pytest.importorskip("executorch")

import torch  # noqa: E402

from edgekd.errors import RecipeError  # noqa: E402
from edgekd.targets import get_format  # noqa: E402

LENGTH = 24


@pytest.fixture(scope="module")
def dynamic_exports(tmp_path_factory, small_data):
    """A briefly trained 2-layer, 64-wide student and its dynamic-length .pte exports (fp32, int8)."""
    from edgekd.compress.quant import get_spec
    from edgekd.targets.export import export_artifact

    from conftest import tiny_student_stage

    root = tmp_path_factory.mktemp("dynamic")
    stage_dir, model, tokenizer, dataset = tiny_student_stage(root, small_data, length=LENGTH, name="dynamic")
    fmt = get_format("android", "executorch")
    exports = {}
    for quant in ("fp32", "int8"):
        exports[quant] = root / f"student-{quant}"
        export_artifact(stage_dir, "distill", fmt, get_spec(quant), dataset, exports[quant],
                        role="student", model_name="tiny", options={"dynamic_length": True})
    return model, tokenizer, dataset, exports


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_dynamic_export_records_its_length_range_and_parity_at_own_and_max_length(dynamic_exports, quant):
    from edgekd.manifest import read_manifest
    from edgekd.targets.export import PADDED_TEXTS

    from conftest import check_reported_test_metrics

    _, tokenizer, dataset, exports = dynamic_exports
    manifest = read_manifest(exports[quant])
    assert manifest["dynamic_length"] is True and manifest["params"]["options"] == {"dynamic_length": True}
    assert manifest["model_inputs"][0] == {"name": "input_ids", "shape": [1, "seq"], "min_shape": [1, 1],
                                           "max_shape": [1, LENGTH], "dtype": "int32"}
    parity = manifest["metrics"]["parity"]
    texts = dataset.validation.texts
    assert len({len(tokenizer(t, truncation=True, max_length=LENGTH)["input_ids"]) for t in texts}) >= 3
    assert parity["own_length"]["texts"] == len(texts)
    assert parity["padded_to_max_length"]["texts"] == min(PADDED_TEXTS, len(texts))
    if quant == "fp32":
        assert parity["own_length"]["max_abs_diff"] <= 1e-4 and parity["padded_to_max_length"]["max_abs_diff"] <= 1e-4
    # the reported accuracy is the artifact's, at each text's own length (not the parity gate re-asserted)
    assert check_reported_test_metrics(exports[quant], dataset) == manifest
    # The benchmark's sample: the parity sample's text of median token length, at its own length, not padded.
    sample = manifest["sample_input"]
    expected = tokenizer(sample["text"], truncation=True, max_length=LENGTH)["input_ids"]
    assert sample["input_ids"] == expected and len(expected) < LENGTH and set(sample["attention_mask"]) == {1}
    lengths = sorted(len(tokenizer(t, truncation=True, max_length=LENGTH)["input_ids"]) for t in texts)
    assert len(expected) == lengths[(len(lengths) - 1) // 2]


def test_dynamic_pte_runs_every_length_up_to_the_bound_and_refuses_longer(dynamic_exports):
    from edgekd.manifest import read_manifest
    from edgekd.targets.executorch import ExecuTorchRunner
    from edgekd.targets.graph import ExportWrapper

    model, _, _, exports = dynamic_exports
    runner = ExecuTorchRunner(exports["fp32"] / read_manifest(exports["fp32"])["artifact"], threads=1)
    reference = ExportWrapper(model).eval()
    generator = torch.Generator().manual_seed(0)
    for length in (1, 2, 7, LENGTH - 1, LENGTH):
        ids = torch.randint(1000, 2000, (1, length), dtype=torch.int32, generator=generator)
        mask = torch.ones(1, length, dtype=torch.int32)
        mask[0, length // 2 + 1:] = 0  # padding inside a shorter input is masked as usual
        with torch.no_grad():
            expected = reference(ids, mask).numpy()
        assert abs(runner(ids, mask) - expected).max() <= 1e-4, length
    too_long = torch.ones(1, LENGTH + 1, dtype=torch.int32)
    with pytest.raises(RuntimeError):  # memory is planned for max_length: the runtime refuses more
        runner(too_long, too_long)


def test_dynamic_length_is_the_executorch_default_and_a_boolean():
    assert get_format("android", "executorch").resolve_options(None) == {"dynamic_length": True}
    assert get_format("android", "executorch").resolve_options({"dynamic_length": False}) == {"dynamic_length": False}
    expected = r"^android/executorch option 'dynamic_length' takes true or false, not 'yes'$"
    with pytest.raises(RecipeError, match=expected):
        get_format("android", "executorch").resolve_options({"dynamic_length": "yes"})
    pytest.importorskip("litert_torch")
    with pytest.raises(RecipeError, match=r"^android/litert has no option 'dynamic_length'"):
        get_format("android", "litert").resolve_options({"dynamic_length": True})
