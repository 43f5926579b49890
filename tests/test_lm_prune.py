"""A decoder student cut by depth and pruned by width (compress/lm_prune.py): planted units go first, pruned
models forward, round-trip and export, bad shapes are one line.

Tiny Llama and Qwen3 decoders (4 layers x 64, 4 query heads, 2 KV heads), trained for a few seconds on a
next-token rule so that every layer matters (with random weights, skipping a layer can lower the loss).
"""
import pytest
import torch

from edgekd.compress.lm_prune import (
    activation_importance,
    choose_layers,
    layer_importance,
    lm_loss,
    prune_decoder,
)
from edgekd.errors import RecipeError

FAMILIES = ["llama", "qwen3"]
PLANTED = 2        # the near-identity layer: its o and down projections zeroed
VOCAB = 256


def batches(n: int = 3, seed: int = 0) -> list[dict]:
    """Sequences following x[t+1] = (5 x[t] + 3) mod VOCAB, right-padded; loss on real tokens only."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.zeros(8, 24, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (8,), generator=generator)
        for t in range(1, 24):
            ids[:, t] = (5 * ids[:, t - 1] + 3) % VOCAB
        mask = torch.ones_like(ids)
        mask[:4, 16:] = 0  # half the rows padded
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def build(family: str, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=tied)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    if family == "qwen2":  # biased q/k/v projections
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))


def train(model, steps: int = 40):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = batches(4, seed=1)
    model.train()
    for step in range(steps):
        batch = data[step % len(data)]
        loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


_TRAINED = {}


def trained(family: str, planted: int = PLANTED, tied: bool = False):
    """A trained tiny decoder whose layer `planted` is the identity (o and down projections zero, frozen)."""
    if (family, planted, tied) not in _TRAINED:
        model = build(family, tied)
        layer = model.model.layers[planted]
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            torch.nn.init.zeros_(linear.weight)
            linear.weight.requires_grad_(False)
        _TRAINED[family, planted, tied] = train(model)
    return _TRAINED[family, planted, tied]


def no_eps(model, width: int):
    """`model` with eps 0 in its norms over `width` hidden channels (not Qwen3's per-head q/k norms)."""
    for module in model.modules():
        if hasattr(module, "variance_epsilon") and module.weight.shape == (width,):
            module.variance_epsilon = 0.0
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["cosine", "loss"])
def test_planted_identity_layer_scores_lowest_and_is_dropped_first(family, method):
    model, data = trained(family), batches()
    scores = layer_importance(model, data, method)
    assert len(scores) == 4 and min(range(4), key=scores.__getitem__) == PLANTED, scores
    assert abs(scores[PLANTED]) < 1e-5  # the identity changes nothing: cosine 1, loss unchanged
    assert min(s for i, s in enumerate(scores) if i != PLANTED) > 1e-3
    assert PLANTED not in choose_layers(scores, 3)
    pruned, plan = prune_decoder(model, data, layers=3, layer_method=method)
    assert plan["layers"]["kept"] == [i for i in range(4) if i != PLANTED]
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]  # KV-cache slots renumbered
    # Dropping an identity layer is exact: the cut model computes what the model did.
    torch.testing.assert_close(logits(pruned, data[0]), logits(model, data[0]))
    assert len(model.model.layers) == 4  # the input model is left as it was


def test_choose_layers_protects_the_ends_unless_told_not_to():
    scores = [0.0, 0.5, 0.4, 0.1]
    assert choose_layers(scores, 2) == [0, 3]
    assert choose_layers(scores, 2, protect_ends=False) == [1, 2]
    assert choose_layers(scores, 3, protect_ends=False) == [1, 2, 3]
    assert choose_layers(scores, 1) == [1]  # one layer: the most important, nothing to protect
    model = trained("llama", planted=0)
    assert prune_decoder(model, batches(), layers=3)[1]["layers"]["kept"] == [0, 1, 3]
    assert prune_decoder(model, batches(), layers=3, protect_ends=False)[1]["layers"]["kept"] == [1, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_least_active_neurons_are_pruned(family):
    import copy

    model = copy.deepcopy(trained(family))
    planted = [3 * i + 1 for i in range(32)]  # their gate rows zeroed: activation exactly 0
    for layer in model.model.layers:
        layer.mlp.gate_proj.weight.data[planted] = 0
    pruned, plan = prune_decoder(model, batches(), ffn_fraction=0.75)
    assert pruned.config.intermediate_size == 96 and plan["mlp"]["kept"] == 96
    kept = sorted(set(range(128)) - set(planted))
    for before, after in zip(model.model.layers, pruned.model.layers):
        assert after.mlp.down_proj.in_features == 96 and after.mlp.up_proj.out_features == 96
        torch.testing.assert_close(after.mlp.down_proj.weight, before.mlp.down_proj.weight[:, kept])
    # Removing neurons that are 0 on every token is exact, up to summation order.
    torch.testing.assert_close(logits(pruned, batches()[0]), logits(model, batches()[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_kv_group_with_silent_values_is_pruned_with_its_query_heads(family):
    import copy

    model = copy.deepcopy(trained(family))
    silent = [0, 1, 1, 0]  # per layer: the KV head whose values are zeroed, so its query heads output 0
    for layer, g in zip(model.model.layers, silent):
        layer.self_attn.v_proj.weight.data[g * 16:(g + 1) * 16] = 0
    pruned, plan = prune_decoder(model, batches(), kv_groups=1)
    assert plan["attention"]["kept_kv_heads"] == [[1 - g] for g in silent]
    assert plan["attention"]["kept_heads"] == [[2, 3] if g == 0 else [0, 1] for g in silent]
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    attention = pruned.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    torch.testing.assert_close(logits(pruned, batches()[0]), logits(model, batches()[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_number_of_query_heads_kept_per_group(family):
    # A query head cannot be silenced alone (its group's values are shared), so the check is against the measured
    # norms: in each layer and group the stronger query head stays, its q rows and o columns carried over.
    model = trained(family)
    scores = activation_importance(model, batches()).heads.view(4, 2, 2)   # [layers, KV heads, heads per group]
    pruned, plan = prune_decoder(model, batches(), heads=2)
    want = [[2 * g + int(scores[i, g].argmax()) for g in range(2)] for i in range(4)]
    assert plan["attention"]["kept_heads"] == want and plan["attention"]["kept_kv_heads"] == [[0, 1]] * 4
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 2)
    for i, (before, after) in enumerate(zip(model.model.layers, pruned.model.layers)):
        rows = [h * 16 + j for h in want[i] for j in range(16)]
        torch.testing.assert_close(after.self_attn.q_proj.weight, before.self_attn.q_proj.weight[rows])
        torch.testing.assert_close(after.self_attn.o_proj.weight, before.self_attn.o_proj.weight[:, rows])
        torch.testing.assert_close(after.self_attn.k_proj.weight, before.self_attn.k_proj.weight)
        assert after.self_attn.num_key_value_groups == 1
    assert logits(pruned, batches()[0]).shape == (8, 24, VOCAB)


@pytest.mark.parametrize("family, tied", [("llama", True), ("qwen3", False)])
def test_silent_hidden_channels_are_pruned_everywhere_exactly(family, tied, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(trained(family, tied=tied))
    silent = list(range(1, 64, 2))  # never written to the residual stream: the embedding's and writers' rows zero
    model.get_input_embeddings().weight.data[:, silent] = 0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data[silent] = 0
        layer.mlp.down_proj.weight.data[silent] = 0
    no_eps(model, 64)  # then the rescaled norms give exactly the same outputs
    pruned, plan = prune_decoder(model, batches(), hidden_fraction=0.5)
    kept = list(range(0, 64, 2))
    assert plan["hidden"]["channels"] == kept and pruned.config.hidden_size == 32 and pruned.config.head_dim == 16
    assert pruned.get_input_embeddings().weight.shape == (VOCAB, 32) and pruned.model.norm.weight.shape == (32,)
    assert (pruned.lm_head.weight is pruned.get_input_embeddings().weight) == tied
    # (with the config's eps 1e-6 the logits moved by up to 9e-3 of a max 8.6)
    torch.testing.assert_close(logits(pruned, batches()[0]), logits(model, batches()[0]), atol=1e-5, rtol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = no_eps(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), 32)
    torch.testing.assert_close(logits(reloaded, batches()[0]), logits(pruned, batches()[0]), atol=0, rtol=0)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2"])
def test_pruned_model_saves_and_reloads_with_identical_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, data = trained(family), batches()
    pruned, plan = prune_decoder(model, data, layers=3, ffn_fraction=0.5, kv_groups=1, hidden_fraction=0.5,
                                 layer_method="loss")
    assert set(plan) >= {"layers", "mlp", "attention", "hidden", "calibration"}
    assert plan["calibration"]["tokens"] == 3 * 160
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    for batch in data:
        torch.testing.assert_close(logits(reloaded, batch), logits(pruned, batch), atol=0, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
    assert lm_loss(reloaded, data) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_changes_nothing(family):
    model, data = trained(family), batches()
    for kwargs in ({}, {"layers": 4, "ffn_fraction": 1.0, "kv_groups": 2, "heads": 4, "hidden_fraction": 1.0}):
        pruned, plan = prune_decoder(model, data, **kwargs)
        assert pruned is not model and "layers" not in plan and "mlp" not in plan and "attention" not in plan
        torch.testing.assert_close(logits(pruned, data[0]), logits(model, data[0]), atol=0, rtol=0)
        assert pruned.config.to_dict() == model.config.to_dict()


@pytest.mark.parametrize("kwargs, words", [
    ({"kv_groups": 3}, "choose kv_groups from 1 to 2"),
    ({"kv_groups": 0}, "choose kv_groups from 1 to 2"),
    ({"heads": 3}, "heads must be one of 2, 4"),
    ({"heads": 6}, "heads must be one of 2, 4"),
    ({"heads": 0}, "heads must be one of 2, 4"),
    ({"kv_groups": 1, "heads": 4}, "heads must be one of 1, 2"),
    ({"layers": 0}, "choose layers from 1 to 4"),
    ({"layers": 5}, "choose layers from 1 to 4"),
    ({"ffn_fraction": 0}, "choose a number in (0, 1]"),
    ({"ffn_fraction": 1.5}, "choose a number in (0, 1]"),
    ({"hidden_fraction": -0.5}, "choose a number in (0, 1], e.g. 0.75"),
    ({"layers": 3, "layer_method": "random"}, "is not one of cosine, loss"),
])
def test_bad_student_shape_is_one_line_before_any_work(kwargs, words):
    model = build("llama")
    # No batches: a shape error must come before any forward pass would need them.
    with pytest.raises(RecipeError) as error:
        prune_decoder(model, [], **kwargs)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_batches_without_labels_or_tokens_are_one_line():
    from edgekd.errors import DataError

    model, batch = build("llama").eval(), batches(1)[0]
    with pytest.raises(DataError, match="no label positions"):
        prune_decoder(model, [{**batch, "labels": torch.full_like(batch["labels"], -100)}], layers=3,
                      layer_method="loss")
    with pytest.raises(DataError, match="no real tokens"):
        prune_decoder(model, [{**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}],
                      ffn_fraction=0.5)


@pytest.mark.slow
def test_pruned_decoder_exports_with_fp32_parity(tmp_path):
    pytest.importorskip("executorch")
    from edgekd.compress.quant import get_spec
    from edgekd.targets.llm_executorch import DecoderRunner, decoder_parity, export_decoder

    pruned, _ = prune_decoder(trained("qwen3"), batches(), layers=3, ffn_fraction=0.5, kv_groups=1,
                              hidden_fraction=0.5)
    out = tmp_path / "student.pte"
    export_decoder(pruned, out, get_spec("fp32"), max_seq_len=32)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (3, 7)]
    parity = decoder_parity(DecoderRunner(out), pruned, prompts, max_new_tokens=8)
    assert parity["passed"], parity


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [dict(layers=2, ffn_fraction=0.5, kv_groups=1),
                                   dict(layers=3, heads=2, hidden_fraction=0.5)])
def test_a_fresh_student_has_the_shape_of_the_cut_and_none_of_its_weights_but_the_embeddings(family, shape):
    """student.init fresh: the same tensors, shape for shape, as prune_decoder gives for the same arguments; the
    teacher's embeddings (and LM head) where the hidden size is the teacher's, random elsewhere, by the seed."""
    from edgekd.distill.student import fresh_decoder

    model, data = trained(family), batches()
    cut, _ = prune_decoder(model, data, **shape)
    fresh, plan = fresh_decoder(model, **shape, seed=3)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in cut.state_dict().items()}
    assert plan["init"] == "fresh" and plan["config"]["num_hidden_layers"] == shape["layers"]
    same_width = "hidden_fraction" not in shape
    assert plan["embeddings"] == ("the teacher's" if same_width else "random")
    embedding = fresh.get_input_embeddings().weight
    assert torch.equal(embedding, model.get_input_embeddings().weight) == same_width
    assert torch.equal(fresh.get_output_embeddings().weight, model.get_output_embeddings().weight) == same_width
    layer = fresh.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(layer, cut.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(layer, fresh_decoder(model, **shape, seed=3)[0].model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(layer, fresh_decoder(model, **shape, seed=4)[0].model.layers[0].mlp.up_proj.weight)
    assert torch.isfinite(logits(fresh.eval(), data[0])).all()
    with pytest.raises(RecipeError, match="kv_groups"):
        fresh_decoder(model, layers=2, kv_groups=3)
