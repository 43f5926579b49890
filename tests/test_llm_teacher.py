"""A decoder LLM as the classifier's teacher (issue 15, lever 2): fine-tuned as a sequence classifier (its pad token
set, or its eos where it has none), teaching a cut of a different encoder (student.model with student.layers) from
the class logits alone, with the transfer set augmented by dropping words (a decoder's tokenizer has no [MASK])."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgekd.data import choose_max_length, load_dataset
from edgekd.distill.augment import augment_sources
from edgekd.distill.distill import distill
from edgekd.distill.finetune import finetune
from edgekd.errors import RecipeProblems
from edgekd.models import load_classifier, load_tokenizer
from edgekd.preflight import preflight
from edgekd.recipe import recipe_from_dict

from conftest import make_rows
from lm_tiny import tiny_bpe_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama saved as a causal LM (what a user's fine-tuned LLM folder holds), with a byte-level
    BPE tokenizer that has neither a pad nor a mask token (as Llama 3.x's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama-teacher")
    tokenizer = tiny_bpe_tokenizer([row["text"] for row in make_rows(96, 1)])
    tokenizer.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llm_taught(tmp_path_factory, llama_dir, tiny_teacher_dir, small_data):
    recipe = recipe_from_dict({
        "version": 1, "name": "llm-teacher", "seed": 0,
        "teacher": {"model": str(llama_dir), "epochs": 2, "batch_size": 16, "learning_rate": 1e-3},
        "data": {k: str(v) for k, v in small_data.items()},
        "student": {"model": str(tiny_teacher_dir), "layers": [1, 3], "epochs": 1, "batch_size": 16,
                    "learning_rate": 1e-3, "augment": 1},
    })
    preflight(recipe)  # augment and the cut of student.model pass the pre-flight with a mask-less decoder teacher
    dataset = load_dataset(recipe)
    out = tmp_path_factory.mktemp("llm-run")
    finetune(recipe, dataset, out / "finetune")
    metrics = distill(recipe, dataset, out / "finetune", out / "distill", out / ".cache")
    return recipe, dataset, out, metrics


def test_a_decoder_teacher_pads_with_its_eos_and_reads_each_texts_last_token(llm_taught):
    _, dataset, out, _ = llm_taught
    teacher = load_classifier(str(out / "finetune")).eval()
    tokenizer = load_tokenizer(str(out / "finetune"))
    assert type(teacher).__name__ == "LlamaForSequenceClassification"
    assert tokenizer.pad_token == tokenizer.eos_token and teacher.config.pad_token_id == tokenizer.eos_token_id
    texts = sorted(dataset.test.texts[:6], key=len)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # the short texts were padded
    with torch.no_grad():
        together = teacher(**batch).logits
        alone = torch.cat([teacher(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_the_student_is_a_cut_of_its_own_model_with_its_own_tokens_and_length(llm_taught, tiny_teacher_dir):
    _, dataset, out, metrics = llm_taught
    config = json.loads((out / "distill" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 2  # layers 1 and 3 of 4
    manifest = json.loads((out / "distill" / "manifest.json").read_text())
    own = load_tokenizer(str(tiny_teacher_dir))
    assert manifest["max_length"] == choose_max_length(own, dataset.train.texts)
    assert metrics["vocabulary"]["original"] == len(own.get_vocab())
    assert metrics["vocabulary"]["test_coverage"]["tokens_covered"] > 0.9  # counted in the student's WordPiece
    assert metrics["transfer_set"]["augmented"] > 0
    assert metrics["test"]["n"] == len(dataset.test)


def test_without_a_mask_token_augmentation_drops_words():
    texts = [row["text"] for row in make_rows(40, 4)]
    made = augment_sources(texts, 2, None, seed=0, p_mask=0.3, p_swap=0.0, p_ngram=0.0)
    assert made and not any("None" in text.split() for _, text in made)
    words = [(len(texts[source].split()), len(text.split())) for source, text in made]
    assert all(after <= before for before, after in words) and any(after < before for before, after in words)
    masked = augment_sources(texts, 2, "[MASK]", seed=0, p_mask=0.3, p_swap=0.0, p_ngram=0.0)
    assert all(len(texts[s].split()) == len(t.split()) for s, t in masked) and any("[MASK]" in t for _, t in masked)


def test_student_layers_of_a_student_model_are_checked_against_that_model(llama_dir, tiny_teacher_dir, small_data):
    data = {"version": 1, "name": "x", "teacher": {"model": str(llama_dir)},
            "data": {k: str(v) for k, v in small_data.items()},
            "student": {"model": str(tiny_teacher_dir), "layers": [1, 4]}}
    with pytest.raises(RecipeProblems) as caught:
        preflight(recipe_from_dict(data))
    assert caught.value.problems == ["student.layers [1, 4] must be increasing, distinct student.model layers in 0..3 "
                                     "(the student.model has 4); e.g. student.layers: [1, 3]"]
    data["student"]["layers"] = [1, 3]  # the fix the line names
    preflight(recipe_from_dict(data))


def test_layer_losses_across_tokenizers_are_refused_before_training(llama_dir, tiny_teacher_dir, small_data):
    data = {"version": 1, "name": "x", "teacher": {"model": str(llama_dir)},
            "data": {k: str(v) for k, v in small_data.items()},
            "student": {"model": str(tiny_teacher_dir), "layers": [1, 3], "hidden_weight": 1.0}}
    with pytest.raises(RecipeProblems) as caught:
        preflight(recipe_from_dict(data))
    assert len(caught.value.problems) == 1
    assert "tokenizes differently from the teacher" in caught.value.problems[0]
    data["student"]["hidden_weight"] = 0.0  # the fix the line names
    preflight(recipe_from_dict(data))
