"""A decoder LM student cut by depth and pruned by width, ranked by activations on a small calibration set.

    HF *ForCausalLM ─▶ layer_importance() ─▶ choose_layers() ─▶ prune_decoder() ─▶ (smaller *ForCausalLM, plan)

The recipe is Minitron's (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice"): importance from a forward
pass over calibration text, then structural removal, then distillation (distill/, not here).

- Depth: a block's importance is 1 - cosine(hidden in, hidden out) averaged over real tokens (ShortGPT's and
  Minitron's "block importance"), or the LM loss increase on label positions when the block is skipped.
  The first and last blocks are kept by default (see `choose_layers`).
- Width: an MLP neuron's importance is the mean |activation| at the down projection's input; an attention
  head's is the mean L2 norm of its slice of the output projection's input. Grouped KV heads are respected:
  whole KV groups go with their query heads, and every kept group keeps the same number of query heads.
  Every layer keeps the same counts, so the family's config fields (intermediate_size, num_attention_heads,
  num_key_value_heads; head_dim unchanged) describe the student and it round-trips through
  save_pretrained / from_pretrained with the Auto classes.

Batches are Hugging Face causal-LM batches: input_ids [B, L] int64, attention_mask [B, L] (1 = real token),
labels [B, L] with -100 where no loss is taken; logits at t predict token t + 1. Where a family keeps its
layers, heads, KV groups and MLP comes from edgekd/architecture.py.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch

from edgekd.architecture import family_of, get_path, set_path
from edgekd.compress.prune import _slice_linear
from edgekd.errors import DataError, RecipeError

PLAN_VERSION = 1
LAYER_METHODS = ("cosine", "loss")
PRUNE_USE = "decoder pruning (compress.lm_prune)"
PRUNE_FIX = "use a Llama, Qwen2/Qwen3 or SmolLM decoder, or skip pruning"


def _family(model):
    return family_of(model, PRUNE_USE, PRUNE_FIX)


def _hidden(output):
    """A block's hidden states [B, L, D]: some families return them alone, others first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _real(batch) -> torch.Tensor:
    """[B, L] bool: the real (non-padding) tokens."""
    return batch["attention_mask"].bool()


def _real_tokens(batches: list[dict]) -> int:
    """Real tokens in `batches`; one DataError line where there are none (nothing to measure)."""
    tokens = sum(int(_real(b).sum()) for b in batches)
    if not tokens:
        raise DataError("the calibration batches have no real tokens (no batches, or attention_mask all 0); "
                        "give some calibration text")
    return tokens


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


# --- measuring ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def lm_loss(model, batches: list[dict]) -> float:
    """Mean next-token cross-entropy over every label position of `batches` (each token weighs the same)."""
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    if not count:
        raise DataError("the calibration batches have no label positions (every label is -100), so no loss can be "
                        "measured; give batches whose labels hold the token ids")
    total = 0.0
    for batch in batches:
        logits = _forward(model, batch).logits[:, :-1].float()   # [B, L-1, vocab]: position t predicts t + 1
        labels = batch["labels"][:, 1:]                           # [B, L-1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                         reduction="sum"))
    return total / count


@dataclass
class Activations:
    """What one calibration pass saw, averaged over real tokens."""
    block: torch.Tensor      # [layers]: 1 - cosine(block input, block output)
    heads: torch.Tensor      # [layers, query heads]: L2 norm of each head's output (the o projection's input)
    neurons: torch.Tensor    # [layers, intermediate]: |activation| at the down projection's input
    channels: torch.Tensor   # [hidden]: |output| of every norm over the hidden channels, summed over the norms
    tokens: int


@torch.no_grad()
def activation_importance(model, batches: list[dict]) -> Activations:
    """One forward pass over `batches` with hooks on every block, its o projection and its down projection."""
    family = _family(model)
    layers, head_dim = family.layer_list(model), family.head_dim(model.config)
    heads = family.layer_heads(layers[0], model.config)
    block = torch.zeros(len(layers), dtype=torch.float64)
    head_norm = torch.zeros(len(layers), heads, dtype=torch.float64)
    neurons = torch.zeros(len(layers), family.mlp(layers[0])[1].in_features, dtype=torch.float64)
    channels = torch.zeros(getattr(model.config, family.hidden_field), dtype=torch.float64)
    real = {}  # the current batch's [B, L] mask, read by the hooks

    def on_block(i):
        def hook(module, args, kwargs, output):
            before = (args[0] if args else kwargs["hidden_states"])[real["mask"]].double()  # [N, D]
            after = _hidden(output)[real["mask"]].double()
            block[i] += (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).sum()
        return hook

    def on_o(i):
        def hook(module, args):
            x = args[0][real["mask"]].double()                           # [N, heads x head_dim]
            head_norm[i] += x.view(x.shape[0], heads, head_dim).norm(dim=-1).sum(0)
        return hook

    def on_down(i):
        def hook(module, args):
            neurons[i] += args[0][real["mask"]].double().abs().sum(0)   # [intermediate]
        return hook

    def on_norm(module, args, output):  # Minitron's embedding-channel importance: the norms' outputs
        channels.add_(_hidden(output)[real["mask"]].double().abs().sum(0))

    tokens = _real_tokens(batches)  # before any hook is attached
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
        handles.append(family.projections(layer)["o"].register_forward_pre_hook(on_o(i)))
        handles.append(family.mlp(layer)[1].register_forward_pre_hook(on_down(i)))
        handles += [get_path(layer, path).register_forward_hook(on_norm) for path in family.layer_norms]
    model.eval()
    try:
        for batch in batches:
            real["mask"] = _real(batch)
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return Activations(block=(block / tokens).float(), heads=(head_norm / tokens).float(),
                       neurons=(neurons / tokens).float(), channels=(channels / tokens).float(), tokens=tokens)


@contextlib.contextmanager
def _skipped(layer):
    """Within the block, `layer` passes its input through unchanged (its output replaced by its input)."""
    def identity(module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        return (before, *output[1:]) if isinstance(output, tuple) else before

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def layer_importance(model, batches: list[dict], method: str = "cosine") -> list[float]:
    """Importance of each block [layers]: "cosine", 1 - cosine(in, out) over real tokens (one pass); or "loss",
    the LM loss on label positions with the block skipped minus the full model's (one pass per block)."""
    if method not in LAYER_METHODS:
        raise RecipeError(f"layer importance method {method!r} is not one of {', '.join(LAYER_METHODS)}")
    if method == "cosine":
        return activation_importance(model, batches).block.tolist()
    base = lm_loss(model, batches)
    scores = []
    for layer in _family(model).layer_list(model):
        with _skipped(layer):
            scores.append(lm_loss(model, batches) - base)
    return scores


def choose_layers(importance: list[float], keep: int, protect_ends: bool = True) -> list[int]:
    """The `keep` most important layers, in order (0-based).

    With `protect_ends` (and keep >= 2) the first and last layers are always kept. Minitron (Sreenivas et al.
    2024, depth pruning) found the first and last layers the most important by LM loss; on SmolLM2-135M
    (perf/lm_prune.py) both scores agree: the first layer ranks 1st of 30 by cosine and by loss, the last 2nd
    by cosine and 4th by loss, so there protection changes nothing. It is a guard for calibration sets too
    small to show it: the first layer turns token embeddings into features, the last feeds the LM head."""
    total = len(importance)
    if not isinstance(keep, int) or not 0 < keep <= total:
        raise RecipeError(f"layers {keep!r}: a decoder of {total} layers keeps 1 to {total} of them; "
                          f"choose layers from 1 to {total}")
    protected = [0, total - 1] if protect_ends and keep >= 2 and total >= 2 else []
    rest = sorted((i for i in range(total) if i not in protected), key=lambda i: importance[i], reverse=True)
    return sorted(protected + rest[: keep - len(protected)])


# --- shape checks -------------------------------------------------------------------------------------------------
def attention_shape(family, config, kv_groups: int | None, heads: int | None) -> tuple[int, int]:
    """(KV heads kept, query heads kept in all) for a requested student shape, or one RecipeError line."""
    total_heads, total_kv = family.num_heads(config), family.num_kv_heads(config)
    per_group = total_heads // total_kv
    kv = total_kv if kv_groups is None else kv_groups
    if not isinstance(kv, int) or not 0 < kv <= total_kv:
        raise RecipeError(f"kv_groups {kv_groups!r}: the model has {total_kv} KV heads ({total_heads} query heads, "
                          f"{per_group} per KV head); choose kv_groups from 1 to {total_kv}")
    valid = [kv * n for n in range(1, per_group + 1)]
    wanted = kv * per_group if heads is None else heads
    if wanted not in valid:
        raise RecipeError(f"heads {heads!r}: with {kv} KV heads every KV head serves the same number of query heads "
                          f"(at most {per_group}, as in the model), so heads must be one of "
                          f"{', '.join(map(str, valid))}")
    return kv, wanted


def check_shape(model, layers: int | None, ffn_fraction: float | None, kv_groups: int | None,
                heads: int | None, hidden_fraction: float | None = None) -> tuple[int, int]:
    """One RecipeError line for a student shape `prune_decoder` cannot build, before any work; else the attention
    it keeps, (KV heads, query heads in all). `model` may be its config alone (a recipe's preflight has no weights
    loaded)."""
    family = _family(model)
    config = getattr(model, "config", model)
    total = family.num_layers(config)
    if layers is not None and (not isinstance(layers, int) or not 0 < layers <= total):
        raise RecipeError(f"layers {layers!r}: the model has {total} layers; choose layers from 1 to {total}")
    if ffn_fraction is not None and not (isinstance(ffn_fraction, (int, float)) and 0 < ffn_fraction <= 1):
        raise RecipeError(f"ffn_fraction {ffn_fraction!r} is the fraction of MLP neurons kept; choose a number in "
                          f"(0, 1], e.g. 0.5")
    kept = attention_shape(family, config, kv_groups, heads)
    if hidden_fraction is not None and not (isinstance(hidden_fraction, (int, float)) and 0 < hidden_fraction <= 1):
        raise RecipeError(f"hidden_fraction {hidden_fraction!r} is the fraction of hidden (embedding) channels kept; "
                          f"choose a number in (0, 1], e.g. 0.75")
    if hidden_fraction is not None and hidden_fraction < 1 and not family.layer_norms:
        raise RecipeError(f"hidden-channel pruning of {family.name} models is not supported (the architecture map "
                          f"does not list their norms); leave hidden_fraction unset")
    return kept


def kept_neurons(size: int, fraction: float) -> int:
    """MLP neurons kept for `fraction`: a multiple of 32 (int4 groups and SIMD kernels) where size >= 64, >= 32."""
    kept = max(1, round(fraction * size))
    return max(32, kept // 32 * 32) if size >= 64 and kept < size else kept


# --- cutting ------------------------------------------------------------------------------------------------------
def _sliced(linear: torch.nn.Linear, keep: list[int], dim: int) -> torch.nn.Linear:
    new = _slice_linear(linear, torch.tensor(keep, dtype=torch.long), dim)
    return new.to(dtype=linear.weight.dtype, device=linear.weight.device)


def _keep_attention(family, layer, groups: list[int], heads: list[int], head_dim: int, per_group: int) -> None:
    """Shrink one layer's attention to KV heads `groups` and query heads `heads` (absolute indices), in place."""
    def rows(indices):
        return [h * head_dim + i for h in indices for i in range(head_dim)]

    projections = family.projections(layer)
    set_path(layer, family.q, _sliced(projections["q"], rows(heads), 0))
    set_path(layer, family.k, _sliced(projections["k"], rows(groups), 0))
    set_path(layer, family.v, _sliced(projections["v"], rows(groups), 0))
    set_path(layer, family.o, _sliced(projections["o"], rows(heads), 1))
    if family.kv_group_attr:
        setattr(get_path(layer, family.attention), family.kv_group_attr, per_group)


def _keep_neurons(family, layer, neurons: list[int]) -> None:
    inputs, output = family.mlp(layer)
    for path, linear in zip(family.mlp_in, inputs):
        set_path(layer, path, _sliced(linear, neurons, 0))
    set_path(layer, family.mlp_out, _sliced(output, neurons, 1))


def _keep_channels(family, model, channels: list[int]) -> None:
    """Shrink the hidden size to `channels` everywhere, in place: the embedding (and a tied lm_head with it),
    every norm, the columns of the linears that read the residual stream and the rows of those that write it."""
    index = torch.tensor(channels, dtype=torch.long)
    embedding = family.embedding(model)
    new = torch.nn.Embedding(embedding.num_embeddings, len(channels), padding_idx=embedding.padding_idx,
                             dtype=embedding.weight.dtype, device=embedding.weight.device)
    new.weight.data.copy_(embedding.weight.data[:, index])
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    set_path(model.base_model, family.embeddings, new)
    if tied:
        head.weight, head.in_features = new.weight, len(channels)
    elif head is not None:
        model.set_output_embeddings(_sliced(head, channels, 1))
    norms = [family.norm(model)] if family.final_norm else []
    for layer in family.layer_list(model):
        norms += [get_path(layer, path) for path in family.layer_norms]
        projections = family.projections(layer)
        for name in ("q", "k", "v"):
            set_path(layer, getattr(family, name), _sliced(projections[name], channels, 1))
        set_path(layer, family.o, _sliced(projections["o"], channels, 0))
        inputs, output = family.mlp(layer)
        for path, linear in zip(family.mlp_in, inputs):
            set_path(layer, path, _sliced(linear, channels, 1))
        set_path(layer, family.mlp_out, _sliced(output, channels, 0))
    # An RMS norm over fewer channels divides by a smaller mean square; scaling its weight by sqrt(old / new) keeps
    # its output where the removed channels carried no energy (exact for silent channels but for the norm's eps).
    scale = math.sqrt(embedding.embedding_dim / len(channels))
    for norm in norms:
        norm.weight = torch.nn.Parameter(norm.weight.data[index] * scale)
    setattr(model.config, family.hidden_field, len(channels))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def _prune_heads(family, model, acts: Activations, kv: int, kept_heads: int) -> dict:
    """In every layer keep the `kv` KV groups of the largest summed head norms, and in each the same number of
    query heads of the largest norms; the config follows. Returns the plan's attention entry."""
    config = model.config
    total_heads, head_dim = family.num_heads(config), family.head_dim(config)
    before, per_group = total_heads // family.num_kv_heads(config), kept_heads // kv
    plan = {"kv_heads": kv, "of_kv_heads": family.num_kv_heads(config), "heads": kept_heads, "of_heads": total_heads,
            "head_dim": head_dim, "kept_kv_heads": [], "kept_heads": [], "head_importance": []}
    for i, layer in enumerate(family.layer_list(model)):
        by_head = acts.heads[i].view(-1, before)                      # [KV heads, query heads per group]
        groups = _top(by_head.sum(1), kv)
        chosen = [g * before + h for g in groups for h in _top(by_head[g], per_group)]
        _keep_attention(family, layer, groups, chosen, head_dim, per_group)
        plan["kept_kv_heads"].append(groups)
        plan["kept_heads"].append(chosen)
        plan["head_importance"].append([round(float(s), 6) for s in acts.heads[i]])
    setattr(config, family.heads_field, kept_heads)
    if family.kv_heads_field:
        setattr(config, family.kv_heads_field, kv)
    if family.head_dim_field:  # explicit: a default of hidden / heads would now be wrong
        setattr(config, family.head_dim_field, head_dim)
    return plan


def _share(scores: torch.Tensor, kept: list[int]) -> float:
    """The fraction of the importance that the kept units hold."""
    return round(float(scores[kept].sum() / scores.sum().clamp_min(1e-12)), 6)


def _prune_mlp(family, model, acts: Activations, kept: int) -> dict:
    """In every layer keep the `kept` neurons of the largest mean |activation|. Returns the plan's mlp entry."""
    plan = {"kept": kept, "of": acts.neurons.shape[1], "importance_share_kept": []}
    for i, layer in enumerate(family.layer_list(model)):
        neurons = _top(acts.neurons[i], kept)
        _keep_neurons(family, layer, neurons)
        plan["importance_share_kept"].append(_share(acts.neurons[i], neurons))
    setattr(model.config, family.ffn_field, kept)
    return plan


def _prune_hidden(family, model, acts: Activations, kept: int) -> dict:
    """Keep the `kept` hidden channels of the largest norm outputs. Returns the plan's hidden entry."""
    head_dim = family.head_dim(model.config)
    channels = _top(acts.channels, kept)
    _keep_channels(family, model, channels)
    if family.head_dim_field:  # explicit: a default of hidden / heads would now be wrong
        setattr(model.config, family.head_dim_field, head_dim)
    return {"kept": kept, "of": acts.channels.numel(), "channels": channels,
            "importance_share_kept": _share(acts.channels, channels)}


def prune_decoder(model, batches: list[dict], layers: int | None = None, ffn_fraction: float | None = None,
                  kv_groups: int | None = None, heads: int | None = None, hidden_fraction: float | None = None,
                  layer_method: str = "cosine", protect_ends: bool = True):
    """A pruned copy of decoder `model` and the plan (what was kept, counts, importance), for the manifest.

    layers: blocks kept (by `layer_method`); ffn_fraction: fraction of MLP neurons kept in every layer; kv_groups:
    KV heads kept (whole groups, with their query heads); heads: query heads kept in all (the same number per
    kept group); hidden_fraction: fraction of hidden (embedding) channels kept, by Minitron's norm-output
    importance (the RMS norms' weights rescaled for the fewer channels they average over).
    None keeps that dimension whole. Width is measured on the depth-cut model, the one it prunes.
    `model` itself is left as it was."""
    family = _family(model)
    kv, kept_heads = check_shape(model, layers, ffn_fraction, kv_groups, heads, hidden_fraction)
    if layer_method not in LAYER_METHODS:
        raise RecipeError(f"layer_method {layer_method!r} is not one of {', '.join(LAYER_METHODS)}")
    config = model.config
    total = family.num_layers(config)
    total_heads = family.num_heads(config)
    plan = {"version": PLAN_VERSION, "method": "minitron activation importance",
            "calibration": {"batches": len(batches), "tokens": _real_tokens(batches)}}

    pruned = copy.deepcopy(model).eval()
    kept_layers = list(range(total))
    if layers is not None and layers < total:
        scores = layer_importance(model, batches, layer_method)
        kept_layers = choose_layers(scores, layers, protect_ends)
        family.keep_layers(pruned, kept_layers)
        plan["layers"] = {"kept": kept_layers, "of": total, "method": layer_method, "protect_ends": protect_ends,
                          "importance": [round(s, 6) for s in scores]}
    ffn_size = family.mlp(family.layer_list(pruned)[0])[1].in_features
    ffn_kept = ffn_size if ffn_fraction is None else kept_neurons(ffn_size, ffn_fraction)
    hidden = getattr(config, family.hidden_field)
    hidden_kept = hidden if hidden_fraction is None else kept_neurons(hidden, hidden_fraction)
    if ffn_kept == ffn_size and kept_heads == total_heads and hidden_kept == hidden:
        return pruned, plan

    acts = activation_importance(pruned, batches)
    if kept_heads < total_heads:
        plan["attention"] = _prune_heads(family, pruned, acts, kv, kept_heads)
    if ffn_kept < ffn_size:
        plan["mlp"] = _prune_mlp(family, pruned, acts, ffn_kept)
    if hidden_kept < hidden:
        plan["hidden"] = _prune_hidden(family, pruned, acts, hidden_kept)
    return pruned, plan
