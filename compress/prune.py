"""Structured pruning: attention heads, FFN neurons and whole layers, ranked on the user's data.

Pruned units are physically removed (smaller Linear layers, fewer layers), so every target
gets a smaller, faster model. Units are ranked by first-order Taylor importance measured on
validation batches: for a unit with output a and loss gradient g, |sum a*g| per example,
summed over examples. For a head this is |dL/dxi| of a head mask xi (Michel et al. 2019,
"Are Sixteen Heads Really Better than One?"); for FFN neurons the same criterion on the
intermediate activations (Molchanov et al. 2019). A layer is ranked by the validation loss
when it alone is removed.

transformers 5 dropped `prune_heads`, and a config cannot give each layer its own number of
heads, so: FFN neurons and layers are pruned by the same amount in every layer, which
the family's FFN and layer-count config fields express (`intermediate_size` / `num_hidden_layers`
for BERT; the model then loads with the Auto classes); pruned heads are recorded in the config as
`edgekd_heads` (heads kept per layer) and `load_classifier` rebuilds those shapes before loading
the weights. Where a family keeps its heads, FFN and layers comes from edgekd/architecture.py.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch

from edgekd.architecture import family_of, set_path
from edgekd.errors import RecipeError
from edgekd.recipe import check_pruning

HEADS_FIELD = "edgekd_heads"


@dataclass(frozen=True)
class PruneSpec:
    """How much to remove: fractions of heads and FFN neurons in each layer, and whole layers."""
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0

    def __post_init__(self):
        check_pruning(self.heads, self.ffn, self.layers)

    @property
    def is_noop(self) -> bool:
        return self.heads == 0 and self.ffn == 0 and self.layers == 0

    @property
    def name(self) -> str:
        parts = [f"heads{round(100 * self.heads)}" if self.heads else "",
                 f"ffn{round(100 * self.ffn)}" if self.ffn else "",
                 f"layers{self.layers}" if self.layers else ""]
        return "-".join(p for p in parts if p) or "none"

    def to_dict(self) -> dict:
        return asdict(self)


PRUNE_USE = "structured pruning (compress.prune)"
PRUNE_FIX = "compress without pruning"


def _family(model):
    return family_of(model, PRUNE_USE, PRUNE_FIX)


def _slice_linear(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A copy of `linear` keeping output rows (dim 0) or input columns (dim 1) `keep`."""
    weight = linear.weight.data.index_select(dim, keep).clone()
    bias = linear.bias.data.index_select(0, keep).clone() if (linear.bias is not None and dim == 0) else (
        None if linear.bias is None else linear.bias.data.clone())
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def keep_heads(family, layer, heads: list[int], head_dim: int) -> None:
    """Shrink one layer's attention to query heads `heads` (in place): q/k/v rows, o columns."""
    rows = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)
    projections = family.projections(layer)
    for name in ("q", "k", "v"):
        set_path(layer, getattr(family, name), _slice_linear(projections[name], rows, 0))
    set_path(layer, family.o, _slice_linear(projections["o"], rows, 1))
    family.set_head_count(layer, len(heads), head_dim)


def keep_neurons(family, layer, neurons: torch.Tensor) -> None:
    """Shrink one layer's FFN to `neurons` (in place): rows of the input linears, columns of the output one."""
    inputs, output = family.mlp(layer)
    for path, linear in zip(family.mlp_in, inputs):
        set_path(layer, path, _slice_linear(linear, neurons, 0))
    set_path(layer, family.mlp_out, _slice_linear(output, neurons, 1))


def apply_head_counts(model, counts: list[int]) -> None:
    """Give a freshly built model the attention shapes recorded in its config (weights come after)."""
    family = _family(model)
    for layer, count in zip(family.layer_list(model), counts):
        keep_heads(family, layer, list(range(count)), family.head_dim(model.config))


@dataclass
class Importance:
    heads: torch.Tensor           # [layers, heads]
    neurons: list[torch.Tensor]   # per layer: [intermediate size]
    layers: torch.Tensor          # [layers]: validation loss with that layer removed


def importance(model, batches: list[dict]) -> Importance:
    """Taylor importance of every head and FFN neuron, and the loss without each layer, on `batches`.

    Each batch is a dict of input_ids, attention_mask and labels tensors.
    """
    family = _family(model)
    layers, head_dim = family.layer_list(model), family.head_dim(model.config)
    heads = torch.zeros(len(layers), family.layer_heads(layers[0], model.config))
    neurons = [torch.zeros(family.mlp(layer)[1].in_features) for layer in layers]
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def capture(key):
        def hook(module, inputs):
            inputs[0].retain_grad()
            captured[key] = inputs[0]
        return hook

    handles = []
    for i, layer in enumerate(layers):  # the inputs of the two output projections: heads and neurons
        handles.append(family.projections(layer)["o"].register_forward_pre_hook(capture(("heads", i))))
        handles.append(family.mlp(layer)[1].register_forward_pre_hook(capture(("ffn", i))))
    model.eval()  # no dropout: rank the units the deployed model uses
    try:
        for batch in batches:
            model.zero_grad()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            for i in range(len(layers)):
                act = captured[("heads", i)]
                taylor = (act * act.grad * mask).sum(1)  # [B, all_head_size]
                heads[i] += taylor.view(taylor.shape[0], -1, head_dim).sum(-1).abs().sum(0).detach()
                act = captured[("ffn", i)]
                neurons[i] += (act * act.grad * mask).sum(1).abs().sum(0).detach()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad()
    return Importance(heads=heads, neurons=neurons, layers=_layer_drop_loss(model, batches))


@torch.no_grad()
def _layer_drop_loss(model, batches: list[dict]) -> torch.Tensor:
    from edgekd.distill.student import cut_layers

    total = len(_family(model).layer_list(model))
    losses = torch.zeros(total)
    if total == 1:
        return losses
    for skip in range(total):
        reduced = cut_layers(model, [i for i in range(total) if i != skip]).eval()
        losses[skip] = sum(float(torch.nn.functional.cross_entropy(
            reduced(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]))
            for b in batches) / len(batches)
    return losses


def kept_neurons(size: int, fraction: float) -> int:
    """FFN neurons left after removing `fraction`, rounded down to a multiple of 32 (int4 groups and
    SIMD kernels want multiples of 32), never below 32."""
    kept = size - math.floor(fraction * size)
    return max(32, kept // 32 * 32) if size >= 64 and fraction else kept


def prune(model, spec: PruneSpec, scores: Importance):
    """A pruned copy of `model`: least important layers, then heads and neurons, removed."""
    family = _family(model)
    layers, head_dim = family.layer_list(model), family.head_dim(model.config)
    total_heads = family.layer_heads(layers[0], model.config)
    drop_heads = math.floor(spec.heads * total_heads)  # < total_heads: PruneSpec keeps heads < 1
    if drop_heads and not family.head_pruning:
        raise RecipeError(f"head pruning of {family.name} models is not supported (one relative position bias "
                          f"holds every head for all layers); set compress.prune.heads: 0")
    if drop_heads and family.num_kv_heads(model.config) != family.num_heads(model.config):
        raise RecipeError(f"head pruning of grouped-query attention ({family.num_heads(model.config)} query heads "
                          f"sharing {family.num_kv_heads(model.config)} KV heads) is not supported; "
                          f"set compress.prune.heads: 0")
    if spec.layers >= len(layers):
        raise RecipeError(f"pruning {spec.layers} layers would remove every layer (the model has {len(layers)}); "
                          f"use at most {len(layers) - 1}")
    from edgekd.distill.student import cut_layers

    # The layer whose removal raises the validation loss least goes first.
    keep_layers = sorted(torch.argsort(scores.layers, descending=True)[: len(layers) - spec.layers].tolist())
    pruned = cut_layers(model, keep_layers) if spec.layers else copy.deepcopy(model)
    kept = []
    for layer, i in zip(family.layer_list(pruned), keep_layers):
        order = torch.argsort(scores.heads[i], descending=True)
        heads = sorted(order[: total_heads - drop_heads].tolist())
        if drop_heads:
            keep_heads(family, layer, heads, head_dim)
        kept.append(len(heads))
        size = scores.neurons[i].numel()
        neurons = torch.argsort(scores.neurons[i], descending=True)[: kept_neurons(size, spec.ffn)]
        if spec.ffn:
            keep_neurons(family, layer, neurons.sort().values)
    config = pruned.config
    setattr(config, family.ffn_field, family.mlp(family.layer_list(pruned)[0])[1].in_features)
    if drop_heads:
        setattr(config, HEADS_FIELD, kept)
    return pruned
