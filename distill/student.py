"""Students built from the teacher: keep a subset of its layers, trim the vocabulary to the domain."""
from __future__ import annotations

import copy

import torch

from edgekd.architecture import family_of
from edgekd.errors import ModelError

CUT_USE = "layer cutting (student.layers)"
CUT_FIX = "give student.model (a ready student, any family) instead"


def cut_layers(teacher, keep: list[int]):
    """A copy of `teacher` with only the layers `keep` (0-based), initialized from its weights."""
    family = family_of(teacher, CUT_USE, CUT_FIX)
    total = len(family.layer_list(teacher))
    bad = [i for i in keep if not 0 <= i < total]
    if bad or len(set(keep)) != len(keep) or list(keep) != sorted(keep):
        raise ModelError(f"student.layers {keep} is not an increasing list of distinct layers in 0..{total - 1} "
                         f"(the teacher has {total})")
    student = copy.deepcopy(teacher)
    family.keep_layers(student, list(keep))
    return student


def layers_to_keep(asked: list[int] | None, total: int) -> list[int]:
    """student.layers, or when it is left out half of `total` layers, evenly, ending at the last ([1, 3, 5] of 6)."""
    return list(asked) if asked is not None else uniform_layers(total, -(-total // 2))


def uniform_layers(total: int, count: int) -> list[int]:
    """`count` teacher layers spread evenly, always ending at the last one (its features feed the head)."""
    if not 0 < count <= total:
        raise ModelError(f"a student of {count} layers cannot be cut from a teacher of {total}")
    return sorted({round(total - 1 - i * total / count) for i in range(count)})


def trim_vocabulary(model, tokenizer, corpus: list[str], margin: int = 0):
    """Keep the tokens `corpus` uses, the special tokens, the alphabet and `margin` frequent others.

    The alphabet (every single-character token and its `##` continuation) means a word the
    corpus never had is still split into known pieces instead of collapsing to [UNK]. The
    margin adds the lowest-id other tokens (WordPiece vocabularies are stored by frequency).
    Returns (model, tokenizer, kept_ids). The new tokenizer gives, for every text whose
    original tokens are all kept, the same tokens under new ids, so the trimmed pair gives
    the same logits as the untrimmed one (WordPiece greedy longest-match never reaches a
    removed token when the original segmentation did not use it).
    """
    from transformers import BertTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordPiece":
        raise ModelError("vocabulary trimming supports WordPiece (BERT-family) tokenizers only; "
                         "set student.trim_vocab: false")
    vocab = tokenizer.get_vocab()
    keep = {i for ids in tokenizer(corpus, add_special_tokens=True)["input_ids"] for i in ids}
    keep |= set(tokenizer.all_special_ids)
    keep |= {i for token, i in vocab.items() if len(token.removeprefix("##")) == 1}
    others = sorted(i for token, i in vocab.items() if i not in keep and not token.startswith("[unused"))
    keep |= set(others[:margin])
    kept_ids = sorted(keep)
    id_to_token = {i: t for t, i in vocab.items()}
    new_vocab = {id_to_token[old]: new for new, old in enumerate(kept_ids)}

    normalizer = backend.normalizer
    trimmed_tok = BertTokenizer(
        vocab=new_vocab,
        do_lower_case=getattr(normalizer, "lowercase", True),
        tokenize_chinese_chars=getattr(normalizer, "handle_chinese_chars", True),
        strip_accents=getattr(normalizer, "strip_accents", None),
        unk_token=tokenizer.unk_token, sep_token=tokenizer.sep_token, pad_token=tokenizer.pad_token,
        cls_token=tokenizer.cls_token, mask_token=tokenizer.mask_token,
        model_max_length=tokenizer.model_max_length,
    )
    trimmed = copy.deepcopy(model)
    old = trimmed.get_input_embeddings()
    rows = torch.tensor(kept_ids)
    new = torch.nn.Embedding(len(kept_ids), old.embedding_dim, padding_idx=new_vocab[tokenizer.pad_token])
    new.weight.data.copy_(old.weight.data[rows])
    trimmed.set_input_embeddings(new)
    trimmed.config.vocab_size = len(kept_ids)
    trimmed.config.pad_token_id = new_vocab[tokenizer.pad_token]
    return trimmed, trimmed_tok, kept_ids


def vocabulary_coverage(tokenizer, kept_ids: list[int], texts: list[str]) -> dict:
    """Share of texts (and tokens) whose original tokens are all kept: where trimming is exact."""
    kept = set(kept_ids)
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    tokens = sum(len(ids) for ids in encoded)
    return {
        "texts_fully_covered": sum(all(i in kept for i in ids) for ids in encoded) / max(1, len(encoded)),
        "tokens_covered": sum(i in kept for ids in encoded for i in ids) / max(1, tokens),
    }


def fresh_student(teacher, shape):
    """A randomly initialized model of the teacher's family with a smaller shape.

    The embedding rows are copied from the teacher when the widths agree (they carry most of
    what a small student knows about words); the rest starts from the family's initializer.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(teacher.config)
    for key, value in vars(shape).items():
        if not hasattr(config, key):
            raise ModelError(f"student.config.{key} does not apply to a {config.model_type} teacher; "
                             f"use student.layers or student.model instead")
        setattr(config, key, value)
    student = AutoModelForSequenceClassification.from_config(config)
    if shape.hidden_size == teacher.config.hidden_size:
        student.get_input_embeddings().load_state_dict(teacher.get_input_embeddings().state_dict())
    return student


def same_tokenization(a, b) -> bool:
    """True when two tokenizers give the same ids for every text (same vocabulary and rules)."""
    if a.get_vocab() != b.get_vocab():
        return False
    backend_a, backend_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if backend_a is None or backend_b is None:
        return type(a) is type(b)
    return str(backend_a.normalizer) == str(backend_b.normalizer) and \
        str(backend_a.pre_tokenizer) == str(backend_b.pre_tokenizer)


def layer_map(choice, student_layers: int, teacher_layers: int, kept: list[int] | None) -> list[int]:
    """Teacher layer (0-based) each student layer learns from in the intermediate losses."""
    if isinstance(choice, list):
        mapping = choice
    elif choice == "last":
        mapping = list(range(teacher_layers - student_layers, teacher_layers))
    elif choice == "auto" and kept is not None:
        mapping = list(kept)
    else:  # uniform: evenly spread, ending at the teacher's last layer
        mapping = uniform_layers(teacher_layers, student_layers)
    if len(mapping) != student_layers or not all(0 <= t < teacher_layers for t in mapping):
        raise ModelError(f"student.layer_map {mapping} must give one teacher layer in 0..{teacher_layers - 1} "
                         f"for each of the student's {student_layers} layers")
    return mapping


INTERMEDIATE_USE = "the intermediate losses (student.hidden_weight, attention_weight, value_weight)"
INTERMEDIATE_FIX = "set all three to 0 (logit distillation works with any family)"


def num_layers(model) -> int:
    return family_of(model, INTERMEDIATE_USE, INTERMEDIATE_FIX).num_layers(model.config)


def fresh_decoder(teacher, layers: int, ffn_fraction: float | None = None, kv_groups: int | None = None,
                  heads: int | None = None, hidden_fraction: float | None = None, seed: int = 0):
    """A randomly initialized decoder LM of the teacher's family and vocabulary, in the shape a cut would have
    (the same arguments and checks as `prune_decoder` in compress/lm_prune.py), and its plan for the manifest.

    The other student kind (DistilGPT-2's and the Llama-3.2 1B/3B recipes start from a smaller config): it
    keeps nothing of the teacher but, where the hidden size is the teacher's, the token embeddings and the LM
    head, as `fresh_student` does; it needs far more distillation data than a cut to catch up."""
    from transformers import AutoModelForCausalLM

    from edgekd.compress.lm_prune import check_shape, kept_neurons

    family = family_of(teacher, "a fresh decoder student")
    kv, kept_heads = check_shape(teacher, layers, ffn_fraction, kv_groups, heads, hidden_fraction)
    config = copy.deepcopy(teacher.config)
    hidden = getattr(config, family.hidden_field)
    width = hidden if hidden_fraction is None else kept_neurons(hidden, hidden_fraction)
    head_dim = family.head_dim(config)
    if family.head_dim_field:
        setattr(config, family.head_dim_field, head_dim)   # explicit: the default hidden / heads would change
    elif width % kept_heads:
        raise ModelError(f"a fresh {family.name} student's hidden size {width} must be a multiple of its "
                         f"{kept_heads} heads; choose student.hidden or student.heads so they divide")
    overrides = {family.layers_field: layers, family.heads_field: kept_heads, family.hidden_field: width,
                 family.ffn_field: kept_neurons(getattr(config, family.ffn_field), ffn_fraction or 1.0)}
    if family.kv_heads_field:
        overrides[family.kv_heads_field] = kv
    for key, value in overrides.items():
        setattr(config, key, value)
    for name in family.per_layer_fields:   # e.g. Qwen3's layer_types: one entry per layer
        values = getattr(config, name, None)
        if isinstance(values, list):
            setattr(config, name, values[:layers])
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config)
    copied = width == hidden
    if copied:   # the token embeddings and the LM head (one tensor where the family ties them)
        student.get_input_embeddings().load_state_dict(teacher.get_input_embeddings().state_dict())
        student.get_output_embeddings().load_state_dict(teacher.get_output_embeddings().state_dict())
    return student.to(teacher.dtype), {"init": "fresh", "config": overrides,
                                       "embeddings": "the teacher's" if copied else "random", "seed": seed}
