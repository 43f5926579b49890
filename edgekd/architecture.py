"""The architecture map: where each model family keeps its layers, attention, FFN/MLP and embeddings.

Layer cutting (distill/student.py), the intermediate losses (distill/trainer.py) and structured
pruning (compress/prune.py) ask this map, so none of them knows it is looking at a BERT. Adding a
family is adding one `Family` to FAMILIES; an unknown model type fails in one line naming the known
ones. Paths are attribute paths: `layers`, `embeddings` and `final_norm` from `model.base_model`,
the others from one layer of the layer list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekd.errors import ModelError


def get_path(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root, path: str, value) -> None:
    owner, _, name = path.rpartition(".")
    setattr(get_path(root, owner) if owner else root, name, value)


@dataclass(frozen=True)
class Family:
    """One family's layout: the modules a stage reads or replaces, and the config fields that describe them."""
    name: str
    model_types: tuple[str, ...]          # config.model_type values that have this layout
    layers: str                           # base model -> ModuleList of layers
    embeddings: str                       # base model -> token embedding
    q: str                                # layer -> query, key, value projections (output rows = heads x head_dim)
    k: str
    v: str
    o: str                                # layer -> attention output projection (input columns = heads x head_dim)
    mlp_in: tuple[str, ...]               # layer -> FFN linears whose output rows are the neurons (gate, up)
    mlp_out: str                          # layer -> FFN linear whose input columns are the neurons (down)
    attention: str                        # layer -> the module that splits the heads
    head_count_attrs: tuple[str, ...]     # its attributes holding (heads, heads x head_dim), set when heads go
    layers_field: str = "num_hidden_layers"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = None     # grouped-query attention; None: one KV head per query head
    head_dim_field: str | None = None     # None: hidden size / heads
    hidden_field: str = "hidden_size"
    ffn_field: str = "intermediate_size"
    final_norm: str | None = None         # base model -> the norm after the last layer (decoders)
    per_layer_fields: tuple[str, ...] = ()  # config lists with one entry per layer: cut with the layers
    layer_index: str | None = None        # layer -> its own index (a decoder's KV-cache slot): renumbered on a cut
    head_pruning: bool = True             # False where one per-head tensor serves every layer (MPNet's position bias)
    kv_group_attr: str | None = None      # attention attribute: query heads per KV head (set when that changes)
    layer_norms: tuple[str, ...] = ()     # layer -> norms over the hidden channels (cut with them; decoders)

    # --- the config -----------------------------------------------------------------------
    def num_layers(self, config) -> int:
        return getattr(config, self.layers_field)

    def num_heads(self, config) -> int:
        return getattr(config, self.heads_field)

    def num_kv_heads(self, config) -> int:
        found = getattr(config, self.kv_heads_field, None) if self.kv_heads_field else None
        return found or self.num_heads(config)

    def head_dim(self, config) -> int:
        found = getattr(config, self.head_dim_field, None) if self.head_dim_field else None
        return found or getattr(config, self.hidden_field) // self.num_heads(config)

    def config_fields(self) -> dict:
        """The config fields to update when layers, heads or FFN neurons are removed."""
        return {"layers": self.layers_field, "heads": self.heads_field, "kv_heads": self.kv_heads_field,
                "ffn": self.ffn_field, "per_layer": list(self.per_layer_fields)}

    # --- the modules ----------------------------------------------------------------------
    def layer_list(self, model) -> torch.nn.ModuleList:
        return get_path(model.base_model, self.layers)

    def embedding(self, model) -> torch.nn.Module:
        return get_path(model.base_model, self.embeddings)

    def norm(self, model) -> torch.nn.Module | None:
        return get_path(model.base_model, self.final_norm) if self.final_norm else None

    def projections(self, layer) -> dict[str, torch.nn.Linear]:
        return {name: get_path(layer, getattr(self, name)) for name in ("q", "k", "v", "o")}

    def mlp(self, layer) -> tuple[list[torch.nn.Linear], torch.nn.Linear]:
        return [get_path(layer, p) for p in self.mlp_in], get_path(layer, self.mlp_out)

    def layer_heads(self, layer, config) -> int:
        """Query heads this layer has now (fewer than the config's after head pruning)."""
        return get_path(layer, self.o).in_features // self.head_dim(config)

    # --- changing the shape ---------------------------------------------------------------
    def keep_layers(self, model, keep: list[int]) -> None:
        """Keep only layers `keep` (0-based, in order) of `model`, in place, and say so in its config."""
        layers = self.layer_list(model)
        kept = torch.nn.ModuleList([layers[i] for i in keep])
        set_path(model.base_model, self.layers, kept)
        setattr(model.config, self.layers_field, len(keep))
        for name in self.per_layer_fields:
            values = getattr(model.config, name, None)
            if isinstance(values, list) and len(values) == len(layers):
                setattr(model.config, name, [values[i] for i in keep])
        if self.layer_index:
            for i, layer in enumerate(kept):
                set_path(layer, self.layer_index, i)

    def set_head_count(self, layer, heads: int, head_dim: int) -> None:
        attention = get_path(layer, self.attention)
        for attr, value in zip(self.head_count_attrs, (heads, heads * head_dim)):
            setattr(attention, attr, value)


_BERT_LAYER = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                   o="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense",
                   attention="attention.self", head_count_attrs=("num_attention_heads", "all_head_size"))

FAMILIES = (
    # MiniLM (all-MiniLM-L6-v2, the built-in model) is a BertModel.
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"), layers="encoder.layer",
           embeddings="embeddings.word_embeddings", **_BERT_LAYER),
    Family("mpnet", ("mpnet",), layers="encoder.layer", embeddings="embeddings.word_embeddings",
           q="attention.attn.q", k="attention.attn.k", v="attention.attn.v", o="attention.attn.o",
           mlp_in=("intermediate.dense",), mlp_out="output.dense", attention="attention.attn",
           head_count_attrs=("num_attention_heads", "all_head_size"), head_pruning=False),
    Family("distilbert", ("distilbert",), layers="transformer.layer", embeddings="embeddings.word_embeddings",
           q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
           mlp_in=("ffn.lin1",), mlp_out="ffn.lin2", attention="attention", head_count_attrs=("n_heads", "dim"),
           layers_field="n_layers", heads_field="n_heads", hidden_field="dim", ffn_field="hidden_dim"),
    # Llama-style decoders: grouped KV heads, a gated MLP, a final norm, per-layer attention types.
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"), layers="layers", embeddings="embed_tokens",
           q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
           mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", attention="self_attn",
           head_count_attrs=(), kv_heads_field="num_key_value_heads", head_dim_field="head_dim",
           final_norm="norm", per_layer_fields=("layer_types",), layer_index="self_attn.layer_idx",
           kv_group_attr="num_key_value_groups", layer_norms=("input_layernorm", "post_attention_layernorm")),
)


def supported() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_of(model_or_config, use: str = "this step", fix: str = "") -> Family:
    """The map entry of a model (or config); otherwise one line naming `use`, the known families and `fix`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    shown = type(model_or_config).__name__
    raise ModelError(f"{use} needs to know where the model keeps its layers, and model type {model_type!r} "
                     f"({shown}) is not in edgekd's architecture map, which has: {supported()}"
                     + (f"; {fix}" if fix else ""))
