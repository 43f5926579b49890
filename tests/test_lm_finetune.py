"""Teacher fine-tuning of a tiny random Llama: the validation perplexity falls; LoRA is merged into a plain model."""
from __future__ import annotations

import json

import pytest
import torch

from edgekd.distill.lm_finetune import METRICS_FILE, LoraSettings, finetune_lm, lora_targets
from edgekd.errors import DataError, RecipeError, StageError
from edgekd.lm_data import Collator, Record, batches, encode
from edgekd.lm_metrics import perplexity

from lm_tiny import tiny_llama, tiny_tokenizer

PAIRS = [("Kestrel Mining profit fell", "negative"), ("Norlund Bank record sales", "positive"),
         ("Vireo Pharma moved its office", "neutral"), ("Arcadia Telecom shares slumped", "negative"),
         ("Solano Retail beat estimates", "positive"), ("Pinecrest Energy kept guidance", "neutral")]


def records(repeat: int) -> list[Record]:
    return [Record(prompt, completion) for prompt, completion in PAIRS] * repeat


def run(tmp_path, name, lora=None, learning_rate=5e-3):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    metrics = finetune_lm(model, tokenizer, records(6), records(1), tmp_path / name, epochs=3,
                          learning_rate=learning_rate, batch_size=8, seed=0, lora=lora, max_length=32)
    return tokenizer, metrics


def test_full_finetuning_lowers_validation_perplexity_and_writes_a_plain_folder(tmp_path):
    tokenizer, metrics = run(tmp_path, "teacher")
    before, after = metrics["validation_before"]["perplexity"], metrics["validation"]["perplexity"]
    print("full", before, after)
    assert after < 0.5 * before
    out = tmp_path / "teacher"
    assert json.loads((out / METRICS_FILE).read_text())["validation"]["perplexity"] == pytest.approx(after)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not list(tmp_path.glob(".teacher.*"))  # no checkpoints or temporary folder left beside it


def test_lora_is_merged_back_into_a_plain_model_that_loads_with_the_auto_class(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tokenizer, metrics = run(tmp_path, "lora", lora=LoraSettings(r=4, alpha=8), learning_rate=2e-2)
    print("lora", metrics["validation_before"]["perplexity"], metrics["validation"]["perplexity"])
    assert metrics["validation"]["perplexity"] < 0.8 * metrics["validation_before"]["perplexity"]
    out = tmp_path / "lora"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("lora" in key or "base_model" in key for key in keys), keys[:5]
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    validation = encode(tokenizer, records(1), 32)
    again = perplexity(loaded, batches(validation, Collator(tokenizer), 8))  # what was saved is what was measured
    assert again["perplexity"] == pytest.approx(metrics["validation"]["perplexity"], rel=1e-4)
    untrained = tiny_llama(len(tokenizer))
    q = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert not torch.equal(q(loaded), q(untrained))  # the adapter's update is in the merged weight
    assert torch.equal(loaded.model.embed_tokens.weight, untrained.model.embed_tokens.weight)  # LoRA left it


def test_a_rerun_after_a_crash_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from edgekd.distill import lm_finetune

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after training, before the teacher was written

    monkeypatch.setattr(lm_finetune, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "teacher")
    assert not (tmp_path / "teacher").exists() and len(list(tmp_path.glob(".teacher.checkpoints-*"))) == 1
    monkeypatch.undo()
    capsys.readouterr()
    _, metrics = run(tmp_path, "teacher")
    assert "resuming from" in capsys.readouterr().err
    assert metrics["validation"]["perplexity"] < 0.5 * metrics["validation_before"]["perplexity"]
    assert (tmp_path / "teacher" / "model.safetensors").is_file() and not list(tmp_path.glob(".teacher.*"))


def test_bad_input_stops_before_training_and_writes_nothing(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    bad = records(1) + [Record("profit fell", "")]
    with pytest.raises(DataError, match="record 7 has an empty completion"):
        finetune_lm(model, tokenizer, bad, records(1), tmp_path / "t", epochs=1, learning_rate=1e-3, batch_size=4,
                    seed=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="max_length 256 is longer than the model's context of 128 tokens"):
        finetune_lm(model, tokenizer, records(1), records(1), tmp_path / "t", epochs=1, learning_rate=1e-3,
                    batch_size=4, seed=0, max_length=256)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not edgekd's")
    with pytest.raises(StageError, match="not empty"):
        finetune_lm(model, tokenizer, records(1), records(1), tmp_path / "mine", epochs=1, learning_rate=1e-3,
                    batch_size=4, seed=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not edgekd's"
    with pytest.raises(RecipeError, match="lora_rank"):
        LoraSettings(r=0)
    assert lora_targets(model) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
