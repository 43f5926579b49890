"""Tiny decoder-LM pieces for the LM tests: a word-level tokenizer over the test sentences and a random Llama."""
from __future__ import annotations

import torch

from edgekd.lm_data import FINSENT_TEMPLATE

from conftest import COMPANIES, WORDS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer(chat_template: str | None = None, eos: bool = True):
    """A word-level tokenizer (about 80 words) with pad, bos and eos tokens and no chat template by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set(FINSENT_TEMPLATE.replace("{text}", "").replace(".", " . ").replace(",", " , ").split())
    for phrase in [*COMPANIES, *(p for phrases in WORDS.values() for p in phrases), *WORDS,
                   "in the first second third fourth quarter analysts said company a filing showed . ,"]:
        words.update(phrase.split())
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation as tokens of its own
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        unk_token="<unk>", eos_token="</s>" if eos else None)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(vocab_size: int = 256, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_bpe_tokenizer(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` (GPT-2 style, as SmolLM2's): one pytorch-tokenizers reads,
    so a .pte's tokenizer.json can be checked in ExecuTorch's own tokenizer library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>",
                                   eos_token="</s>")
