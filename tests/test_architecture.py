"""The architecture map (edgekd/architecture.py): every family's entry on a tiny model built from a config,
layer cutting of a decoder, and structured pruning through the map beyond BERT."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from edgekd.architecture import FAMILIES, family_of
from edgekd.compress.prune import HEADS_FIELD, PruneSpec, importance, prune
from edgekd.distill.student import cut_layers
from edgekd.errors import ModelError, RecipeError
from edgekd.models import load_classifier

ENCODER = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=40)
DECODER = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               max_position_embeddings=64)


def tiny(model_type: str, auto=T.AutoModelForSequenceClassification, **overrides):
    torch.manual_seed(0)
    if model_type == "distilbert":
        config = T.DistilBertConfig(vocab_size=60, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                    max_position_embeddings=40)
    else:
        fields = DECODER if model_type in family_of_name("llama").model_types else ENCODER
        config = T.AutoConfig.for_model(model_type, **{**fields, **overrides})
    config.num_labels = 3
    return auto.from_config(config).eval()


def family_of_name(name: str):
    return next(f for f in FAMILIES if f.name == name)


ALL_TYPES = [t for f in FAMILIES for t in f.model_types]


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_every_entry_finds_layers_heads_projections_mlp_and_embeddings(model_type):
    model = tiny(model_type)
    family, config = family_of(model), model.config
    layers = family.layer_list(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == family.num_layers(config) == 3
    heads, kv, dim = family.num_heads(config), family.num_kv_heads(config), family.head_dim(config)
    assert (heads, kv, dim) == ((4, 2, 8) if family.name == "llama" else (4, 4, 8))
    for layer in layers:
        p = family.projections(layer)
        assert p["q"].out_features == heads * dim and p["o"].in_features == heads * dim
        assert p["k"].out_features == p["v"].out_features == kv * dim
        inputs, output = family.mlp(layer)
        ffn = getattr(config, family.ffn_field)
        assert [linear.out_features for linear in inputs] == [ffn] * len(family.mlp_in) and output.in_features == ffn
        assert family.layer_heads(layer, config) == heads
    embedding = family.embedding(model)
    assert isinstance(embedding, torch.nn.Embedding) and embedding is model.get_input_embeddings()
    assert (family.norm(model) is not None) == (family.name == "llama")


def test_a_causal_lm_is_mapped_like_its_classifier():
    model = tiny("qwen3", T.AutoModelForCausalLM)
    family = family_of(model)
    assert family.name == "llama" and family.layer_list(model) is model.model.layers
    assert family.projections(model.model.layers[1])["v"] is model.model.layers[1].self_attn.v_proj
    assert family.mlp(model.model.layers[0])[1] is model.model.layers[0].mlp.down_proj
    assert family.norm(model) is model.model.norm
    assert family.config_fields() == {"layers": "num_hidden_layers", "heads": "num_attention_heads",
                                      "kv_heads": "num_key_value_heads", "ffn": "intermediate_size",
                                      "per_layer": ["layer_types"]}


def test_an_unknown_family_is_one_line_naming_the_known_ones():
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    with pytest.raises(ModelError) as caught:
        family_of(model, "structured pruning", "compress without pruning")
    message = str(caught.value)
    assert "\n" not in message and "'gpt2'" in message and message.endswith("; compress without pruning")
    assert all(t in message for t in ALL_TYPES)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_cut_decoder_keeps_its_weights_and_its_kv_cache_works(model_type):
    """Cutting renumbers each layer's cache slot and cuts per-layer config lists: the cut model decodes
    with a cache exactly as it runs without one."""
    model = tiny(model_type, T.AutoModelForCausalLM)
    student = cut_layers(model, [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    if getattr(model.config, "layer_types", None):
        assert len(student.config.layer_types) == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    assert len(model.model.layers) == 3                                    # the teacher is untouched
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        full = student(ids).logits[0, -1]
        prefill = student(ids[:, :-1], use_cache=True)
        step = student(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def _batches(vocab: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (4, 10), generator=g),
             "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("model_type, overrides", [("distilbert", {}), ("qwen3", {}),
                                                   ("llama", {"num_key_value_heads": 4})])
def test_pruning_through_the_map_removes_units_and_reloads_exactly(model_type, overrides, tmp_path):
    model = tiny(model_type, **overrides)
    family, config = family_of(model), model.config
    grouped = family.num_kv_heads(config) != family.num_heads(config)
    spec = PruneSpec(heads=0.0 if grouped else 0.5, ffn=0.5, layers=1)
    pruned = prune(model, spec, importance(model, _batches(config.vocab_size)))
    layers = family.layer_list(pruned)
    assert len(layers) == 2 == family.num_layers(pruned.config)
    ffn = getattr(config, family.ffn_field) // 2
    assert all(family.mlp(layer)[1].in_features == ffn for layer in layers)
    assert getattr(pruned.config, family.ffn_field) == ffn
    if not grouped:
        assert getattr(pruned.config, HEADS_FIELD) == [2, 2]
        assert all(family.layer_heads(layer, pruned.config) == 2 for layer in layers)
    pruned.save_pretrained(tmp_path)
    reloaded = load_classifier(str(tmp_path))
    batch = _batches(config.vocab_size, 1)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(pruned(**inputs).logits, reloaded(**inputs).logits)


def test_head_pruning_is_refused_where_the_map_cannot_do_it():
    qwen = tiny("qwen3")
    with pytest.raises(RecipeError, match="grouped-query attention .* compress.prune.heads: 0"):
        prune(qwen, PruneSpec(heads=0.5), importance(qwen, _batches(64, 1)))
    mpnet = tiny("mpnet")
    with pytest.raises(RecipeError, match="mpnet .* compress.prune.heads: 0"):
        prune(mpnet, PruneSpec(heads=0.5), importance(mpnet, _batches(60, 1)))


def test_the_value_relation_loss_reads_a_decoders_value_projection_and_kv_heads():
    from edgekd.distill.student import num_layers
    from edgekd.distill.trainer import _heads, _value_heads, _value_module

    model = tiny("qwen3", T.AutoModelForCausalLM)
    assert _value_module(model, -1) is model.model.layers[-1].self_attn.v_proj
    assert (_heads(model), _value_heads(model), num_layers(model)) == (4, 2, 3)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    with pytest.raises(ModelError, match="set all three to 0"):  # one line, not a raw ValueError
        _value_module(gpt2, -1)
