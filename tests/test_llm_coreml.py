"""Core ML decoder export (targets/llm_coreml.py) on a tiny random Llama: a stateful iOS 18 .mlpackage per spec.

Off macOS nothing runs Core ML, so these tests check what export checks there: the torch wrapper against the HF
model (and that the check catches a broken wrapper), and the saved package read back from disk (and that the check
refuses a wrong one). Running the package is the macOS-only test at the end.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from edgekd.errors import ExportError
from edgekd.targets import RuntimeUnavailable, llm_coreml
from edgekd.targets.llm_coreml import (
    StatefulDecoder,
    check_coreml_decoder,
    coreml_causal_mask,
    coreml_decoder_expected,
    coreml_decoder_parity,
    coreml_decoder_quant,
    export_coreml_decoder,
    wrapper_parity,
)

from lm_tiny import tiny_llama

ct = pytest.importorskip("coremltools")

MAX_SEQ_LEN = 32
ON_MAC = sys.platform == "darwin"
# spec asked -> how the package stores its weights (int8 and int4 are realized weight-only: Core ML has no
# dynamic activation quantization)
SPECS = {"int4": "int4", "fp16": "fp16", "int8": "int8"}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def packages(model, tmp_path_factory):
    """spec name -> (package path, export details), one export each (about 12 s apiece on 2 cores)."""
    folder = tmp_path_factory.mktemp("coreml")
    attention = model.config._attn_implementation
    made = {name: (folder / f"tiny_{name}.mlpackage",
                   export_coreml_decoder(model, folder / f"tiny_{name}.mlpackage", name, MAX_SEQ_LEN))
            for name in SPECS}
    assert model.config._attn_implementation == attention  # the model is left as it was
    return made


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name", SPECS)
def test_export_writes_a_checked_stateful_package(packages, model, name):
    path, details = packages[name]
    assert path.is_dir() and not _leftovers(path.parent)  # renamed into place, no partial sibling left
    assert details["check"]["passed"], details["check"]["failures"]
    for proof in ("wrapper_parity", "exported_parity"):  # the torch wrapper, then the very graph converted
        assert details[proof]["passed"] and details[proof]["worst_logit_diff"] < 1e-5, proof
    assert details["deployment_target"] == "iOS18" and details["compute_precision"] == "float16"
    assert details["quant"]["weights"] == SPECS[name] and details["quant_asked"] == name
    assert details["size_bytes"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert [(i["name"], i["dtype"], i["shape"]) for i in details["inputs"]] == [
        ("input_ids", "int32", [1, "1..32"]), ("causal_mask", "float16", [1, 1, "1..32", "1..32"])]
    cache = [2, 1, 2, MAX_SEQ_LEN, 16]  # layers, batch, kv heads, positions, head dim
    assert details["states"] == [{"name": n, "dtype": "float16", "shape": cache} for n in ("keyCache", "valueCache")]
    assert details["outputs"] == [{"name": "logits", "dtype": "fp16", "shape": [1, "n", 256]}]
    # the same check, run again from the arguments alone
    assert check_coreml_decoder(path, coreml_decoder_expected(model, name, MAX_SEQ_LEN))["passed"]


def test_weights_are_stored_as_asked(packages):
    weights = {name: details["weights"] for name, (_, details) in packages.items()}
    assert weights["int4"]["int4"]["op"] == "constexpr_blockwise_shift_scale"
    assert weights["int8"]["int8"]["op"] == "constexpr_blockwise_shift_scale"
    assert set(weights["fp16"]) <= {"fp16", "fp16 (at most 2048 elements)"}
    assert set(weights["int4"]) <= {"int4", "fp16 (at most 2048 elements)"}  # what coremltools leaves: small ones
    blocks = llm_coreml.inspect_coreml_decoder(packages["int4"][0])["blocks"]
    assert blocks and all(b["blocks"] == [1, 32] for b in blocks)  # every int4 tensor in blocks of 32 along a row
    sizes = {name: details["size_bytes"] for name, (_, details) in packages.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"]


def test_check_refuses_a_wrong_package(packages, model, tmp_path):
    fp16 = packages["fp16"][0]
    as_int4 = check_coreml_decoder(fp16, coreml_decoder_expected(model, "int4", MAX_SEQ_LEN))
    assert not as_int4["passed"] and [name for name, ok in as_int4["checks"].items() if not ok] == ["weights"]
    assert "stored as int4" in as_int4["failures"][0]
    longer = check_coreml_decoder(packages["int4"][0], coreml_decoder_expected(model, "int4", 64))
    assert not longer["checks"]["inputs"] and not longer["checks"]["states"] and longer["checks"]["weights"]

    class Plain(torch.nn.Module):  # the same interface shape without any state
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(256, 64), torch.nn.Linear(64, 256)

        def forward(self, ids):
            return self.head(self.embed(ids))

    program = torch.export.export(Plain().eval(), (torch.zeros(1, 4, dtype=torch.long),)).run_decompositions()
    plain = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       inputs=[ct.TensorType(name="input_ids", shape=(1, 4), dtype=np.int32)],
                       outputs=[ct.TensorType(name="logits", dtype=np.float16)], skip_model_load=True)
    plain.save(str(tmp_path / "plain.mlpackage"))
    stateless = check_coreml_decoder(tmp_path / "plain.mlpackage", coreml_decoder_expected(model, "fp16", 32))
    assert not stateless["passed"]
    assert not any(stateless["checks"][name] for name in ("inputs", "states", "states_written", "logits"))


class PositionsWithoutPast(StatefulDecoder):
    """A classic cache bug: every call's tokens numbered from 0, as if nothing were cached."""

    def positions(self, n, past):
        return torch.arange(n).unsqueeze(0)


class NoMask(StatefulDecoder):
    """Another: the mask dropped, so a prefill attends to later tokens of its own chunk."""

    def forward(self, input_ids, causal_mask):
        return super().forward(input_ids, torch.zeros_like(causal_mask))


def test_wrapper_parity_catches_a_broken_wrapper(model):
    assert wrapper_parity(StatefulDecoder(model, MAX_SEQ_LEN), model)["passed"]
    for broken in (PositionsWithoutPast, NoMask):
        result = wrapper_parity(broken(model, MAX_SEQ_LEN), model)
        # caught by a wide margin: random tiny weights move logits little, a trained model moves them whole
        assert not result["passed"] and result["worst_logit_diff"] > 10 * llm_coreml.WRAPPER_TOLERANCE, broken.__name__


def test_export_refuses_a_broken_wrapper_and_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_coreml, "StatefulDecoder", PositionsWithoutPast)
    with pytest.raises(ExportError, match="stateful torch wrapper differs"):
        export_coreml_decoder(model, tmp_path / "broken.mlpackage", "fp16", MAX_SEQ_LEN)
    assert list(tmp_path.iterdir()) == []


def test_spec_mapping_and_refusals():
    assert coreml_decoder_quant("int4") == {"quant_asked": "int4", "activations": "float16", "weights": "int4",
                                            "mode": "linear_symmetric", "granularity": "per_block", "block_size": 32}
    assert coreml_decoder_quant("int4-g64")["block_size"] == 64
    assert coreml_decoder_quant("int8-weights")["granularity"] == "per_channel"
    assert coreml_decoder_quant("fp32") == {"quant_asked": "fp32", "activations": "float16", "weights": "fp16"}
    for name in ("int8-static", "int4-hqq", "palettize4"):
        with pytest.raises(ExportError) as caught:
            coreml_decoder_quant(name)
        message = str(caught.value)
        assert "\n" not in message and name in message and message.endswith("use int4, int4-g64, int8-weights or fp16")


def test_refuses_what_it_cannot_export_before_converting(model, tmp_path):
    with pytest.raises(ExportError, match="max_position_embeddings"):
        export_coreml_decoder(model, tmp_path / "long.mlpackage", "fp16", 1000)
    with pytest.raises(ExportError, match="named \\*.mlpackage"):
        export_coreml_decoder(model, tmp_path / "model.pte", "fp16", MAX_SEQ_LEN)
    with pytest.raises(ExportError, match="use int4, int4-g64"):
        export_coreml_decoder(model, tmp_path / "static.mlpackage", "int8-static", MAX_SEQ_LEN)
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_out_path_is_left_alone(model, tmp_path):
    folder = tmp_path / "theirs.mlpackage"
    folder.mkdir()
    (folder / "notes.txt").write_text("not edgekd's")
    (tmp_path / "file.mlpackage").write_text("a file")
    for path in (folder, tmp_path / "file.mlpackage"):
        with pytest.raises(ExportError, match="edgekd did not write it"):
            export_coreml_decoder(model, path, "fp16", MAX_SEQ_LEN)
    assert (folder / "notes.txt").read_text() == "not edgekd's" and (tmp_path / "file.mlpackage").is_file()
    assert not _leftovers(tmp_path)


def test_an_own_package_is_replaced_atomically(packages, model, tmp_path):
    """The save step on its own (no new conversion): a package edgekd wrote is replaced; one failing its check
    never replaces anything."""
    out = tmp_path / "tiny.mlpackage"
    shutil.copytree(packages["fp16"][0], out)
    int8 = ct.models.MLModel(str(packages["int8"][0]), skip_model_load=True)
    llm_coreml._save_checked(int8, out, coreml_decoder_expected(model, "int8", MAX_SEQ_LEN))
    assert check_coreml_decoder(out, coreml_decoder_expected(model, "int8", MAX_SEQ_LEN))["passed"]
    with pytest.raises(ExportError, match="fails its structural check: weights"):
        llm_coreml._save_checked(int8, out, coreml_decoder_expected(model, "int4", MAX_SEQ_LEN))
    assert check_coreml_decoder(out, coreml_decoder_expected(model, "int8", MAX_SEQ_LEN))["passed"]
    assert not _leftovers(tmp_path)


def test_causal_mask():
    mask = coreml_causal_mask(2, 3)
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == np.float16
    assert (mask[0, 0] == 0).tolist() == [[True] * 4 + [False], [True] * 5]


class TorchRunner:
    """CoreMLDecoder's interface over a torch wrapper, so coreml_decoder_parity's own logic runs off macOS."""

    load_ms = 0.0

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def new_state(self):
        for name in ("keyCache", "valueCache"):
            self.wrapper.get_buffer(name).zero_()

    def step(self, state, tokens, past):
        mask = torch.from_numpy(coreml_causal_mask(len(tokens), past, np.float32))
        return self.wrapper(torch.tensor([tokens]), mask)[0].numpy()


def test_parity_logic_with_a_torch_runner(model, monkeypatch):
    for wrapper, passes in ((StatefulDecoder, True), (PositionsWithoutPast, False)):
        monkeypatch.setattr(llm_coreml, "CoreMLDecoder", lambda path, w=wrapper: TorchRunner(w(model, MAX_SEQ_LEN)))
        result = coreml_decoder_parity("unused.mlpackage", model, [[1, 5, 9, 14], [3]], 5, tolerance=1e-4)
        assert result["passed"] is passes and result["prompts"] == 2, wrapper.__name__
        if passes:
            assert result["prompts_equal"] == 2 and result["teacher_forced_agreement"] == 1.0


@pytest.mark.skipif(ON_MAC, reason="checks the refusal off macOS")
def test_parity_refuses_off_macos(packages, model):
    with pytest.raises(RuntimeUnavailable, match="only on macOS"):
        coreml_decoder_parity(packages["fp16"][0], model, [[1, 5, 9]], 4)


@pytest.mark.skipif(not ON_MAC, reason="Core ML runs only on macOS 15+: make_state() and predict(state=...)")
def test_package_runs_like_the_model_on_macos(packages, model):
    result = coreml_decoder_parity(packages["fp16"][0], model, [[1, 5, 9, 14], [1, 7]], 6)
    assert result["passed"], result
