"""LiteRT .tflite: litert-torch conversion, ai-edge-quantizer recipes, the LiteRT runner, export end to end.

Tiny random BERTs built from configs; each conversion takes 5-15 s on 2 cores, so the float
.tflite is converted once per module and the quantization recipes are applied to its bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from edgekd.compress.quant import get_spec  # noqa: E402
from edgekd.errors import ExportError  # noqa: E402
from edgekd.targets import get_format, litert  # noqa: E402
from edgekd.targets.graph import ExportWrapper  # noqa: E402

from conftest import check_reported_test_metrics, tiny_student_stage  # noqa: E402

LENGTH, VOCAB = 32, 1000


def random_inputs(n: int, seed: int, vocab: int = VOCAB, length: int = LENGTH):
    """(ids, mask) pairs as encode_fixed gives them: int32 [1, L], real tokens then padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        used = int(rng.integers(4, length + 1))
        ids, mask = torch.zeros(1, length, dtype=torch.int32), torch.zeros(1, length, dtype=torch.int32)
        ids[0, :used] = torch.from_numpy(rng.integers(1, vocab, used).astype(np.int32))
        mask[0, :used] = 1
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    m = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # random BERT logits differ by ~0.01; spread them so top-1 means something
        m.classifier.weight.mul_(30)
    return m


@pytest.fixture(scope="module")
def probes():
    return random_inputs(64, seed=1)


@pytest.fixture(scope="module")
def reference(model, probes):
    with torch.no_grad():
        return torch.cat([ExportWrapper(model)(ids, mask) for ids, mask in probes]).numpy()


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    file = tmp_path_factory.mktemp("litert") / "fp32.tflite"
    details = litert.export_litert(model, get_spec("fp32"), LENGTH, [], file)
    return file, details


def run(file: Path, inputs) -> np.ndarray:
    runner = litert.LiteRTRunner(file, threads=1)
    return np.concatenate([runner(ids, mask) for ids, mask in inputs])


def test_fp32_matches_pytorch_with_int32_inputs(fp32, probes, reference):
    file, details = fp32
    produced = run(file, probes)
    assert np.abs(produced - reference).max() <= 1e-4
    assert details["input_names"] == ["serving_default_input_ids", "serving_default_attention_mask"]
    assert details["input_dtypes"] == ["int32", "int32"] and details["output_dtypes"] == ["float32"]
    assert details["ops"]["FULLY_CONNECTED"] == 14 and details["op_count"] == sum(details["ops"].values())
    assert details["quantized_tensors"] == 0


def test_xnnpack_delegation_is_reported(fp32):
    _, details = fp32
    assert details["observable"] and details["delegate_calls"] >= 1
    # The embedding lookup and the mask's cast stay on LiteRT's CPU kernels; everything else is delegated.
    assert details["delegated_ops"] + details["non_delegated_nodes"] == details["op_count"]
    assert details["delegated_ops"] > 0.9 * details["op_count"]
    assert "EMBEDDING_LOOKUP" in details["non_delegated_ops"]


def test_runner_records_load_time_and_versions(fp32):
    runner = litert.LiteRTRunner(fp32[0], threads=2)
    assert runner.load_ms > 0
    assert set(runner.versions()) == {"ai-edge-litert", "litert-torch", "ai-edge-quantizer"}


@pytest.mark.parametrize("name, max_ratio, min_agreement", [
    ("fp16", 0.65, 0.98),
    ("int8", 0.45, 0.95),          # dynamic: int8 weights and embedding rows, float activations
    ("int8-weights", 0.45, 0.95),
    ("int4", 0.32, 0.85),          # blockwise 32; random weights lose more than trained ones
    ("int4-g64", 0.32, 0.75),
])
def test_recipes_shrink_and_agree(fp32, probes, reference, tmp_path, name, max_ratio, min_agreement):
    file = tmp_path / f"{name}.tflite"
    data = litert.quantize(fp32[0].read_bytes(), get_spec(name), [])
    file.write_bytes(data)
    summary = litert.model_summary(data)
    assert summary["quantized_tensors"] >= 15          # 14 linear weights + the embedding table
    assert len(data) <= max_ratio * fp32[0].stat().st_size
    produced = run(file, probes)
    assert (produced.argmax(-1) == reference.argmax(-1)).mean() >= min_agreement


def test_int8_static_is_full_int8_and_masks_padding(model, probes, reference, tmp_path):
    file = tmp_path / "static.tflite"
    details = litert.export_litert(model, get_spec("int8-static"), LENGTH, random_inputs(100, seed=2), file)
    assert details["output_dtypes"] == ["int8"] and details["input_dtypes"] == ["int32", "int32"]
    assert details["tensor_dtypes"]["INT8"] > 10 * details["tensor_dtypes"].get("FLOAT32", 0)
    produced = run(file, probes)  # the runner dequantizes the int8 logits
    assert (produced.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    # Padded positions must not matter. With float32's minimum as the additive mask, calibration
    # rounded the mask to 0 and the int8 model attended to padding; StaticInt8Wrapper's -30 does not.
    ids, mask = probes[0]
    noisy = ids.clone()
    noisy[mask == 0] = 7
    runner = litert.LiteRTRunner(file, threads=1)
    assert (mask == 0).any() and np.array_equal(runner(ids, mask), runner(noisy, mask))


def test_group_size_that_does_not_divide_the_width_is_one_line(fp32):
    with pytest.raises(ExportError) as error:
        litert.quantize(fp32[0].read_bytes(), get_spec("int4-g128"), [])
    message = str(error.value)
    assert "\n" not in message and "int4-g128" in message and "int4-g64" in message


def test_android_litert_format_is_registered():
    fmt = get_format("android", "litert")
    assert fmt.backend == "litert" and fmt.suffix == "tflite" and fmt.extra == "litert"
    assert "int4-weights" not in fmt.specs and {"fp32", "int8", "int8-static", "int4"} <= set(fmt.specs)


# --- export_artifact end to end -------------------------------------------------------------

@pytest.fixture(scope="module")
def model_stage(tmp_path_factory, small_data):
    """A briefly trained 2-layer student in a stage directory, with the built-in WordPiece tokenizer."""
    stage_dir, _, _, dataset = tiny_student_stage(tmp_path_factory.mktemp("stage"), small_data, LENGTH, "litert")
    return stage_dir, dataset




@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_export_artifact_end_to_end(model_stage, tmp_path, quant):
    from edgekd.manifest import verify_stage
    from edgekd.targets.export import export_artifact

    stage_dir, dataset = model_stage
    out = tmp_path / quant
    metrics = export_artifact(stage_dir, "distill", get_format("android", "litert"), get_spec(quant), dataset,
                              out, role="student", model_name="student")
    manifest = verify_stage(out, "export")
    assert manifest["artifact"] == f"student_litert_{quant}.tflite"
    assert manifest["delegation"]["ops"]["FULLY_CONNECTED"] == 14
    assert manifest["runtime"]["litert-torch"] == "0.10.0"
    if quant == "fp32":
        assert metrics["parity"]["max_abs_diff"] <= 1e-4
    elif metrics["parity"]["checked"] == "numerical":  # against the same file in LiteRT's reference kernels
        assert metrics["parity"]["reference"].startswith("the same .tflite in LiteRT's reference kernels")
    if quant != "fp32":
        assert metrics["vs_fp32"]["validation"]["texts"] == len(dataset.validation.texts)
    # not the parity gate's threshold again (the export enforces it): the reported accuracy, recomputed
    assert check_reported_test_metrics(out, dataset)["metrics"] == metrics


def test_export_artifact_refuses_a_spec_litert_does_not_realize(model_stage, tmp_path):
    from edgekd.targets.export import export_artifact

    stage_dir, dataset = model_stage
    with pytest.raises(ExportError) as error:
        export_artifact(stage_dir, "distill", get_format("android", "litert"), get_spec("int4-weights"), dataset,
                        tmp_path / "x", role="student", model_name="student")
    assert "\n" not in str(error.value) and "it supports: fp32, fp16, int8" in str(error.value)
    assert not (tmp_path / "x").exists()
