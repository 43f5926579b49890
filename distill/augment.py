"""Transfer-set augmentation: more text for the teacher to label, so the student sees its soft targets
on many more inputs than the labelled set has.

Tang et al., 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", sec. 3.3:
per word, with p_mask replace it by [MASK] (drop it where the teacher's tokenizer has no mask token, as a
decoder LLM's has not), with p_swap by another word of the corpus; then with p_ngram keep only a random
n-gram (n in 1..5) of the result. The teacher labels every new text; hard labels
are not used for them.
"""
from __future__ import annotations

import random


def augment(texts: list[str], copies: int, mask_token: str | None, seed: int, **probabilities) -> list[str]:
    """`copies` perturbed versions of each text (deduplicated against the originals and each other)."""
    return [text for _, text in augment_sources(texts, copies, mask_token, seed, **probabilities)]


def augment_sources(texts: list[str], copies: int, mask_token: str | None, seed: int, p_mask: float = 0.1,
                    p_swap: float = 0.1, p_ngram: float = 0.25) -> list[tuple[int, str]]:
    """augment()'s texts, each with the index in `texts` of the text it was made from."""
    masked = [mask_token] if mask_token else []  # a decoder's tokenizer has no [MASK]: the word is dropped instead
    rng = random.Random(seed)
    vocabulary = sorted({word for text in texts for word in text.split()})
    seen = set(texts)
    out = []
    for _ in range(copies):
        for source, text in enumerate(texts):
            words = text.split()
            new = []
            for word in words:
                draw = rng.random()
                new += masked if draw < p_mask else [rng.choice(vocabulary) if draw < p_mask + p_swap else word]
            if len(new) > 1 and rng.random() < p_ngram:
                n = rng.randint(1, min(5, len(new)))
                start = rng.randint(0, len(new) - n)
                new = new[start:start + n]
            candidate = " ".join(new)
            if candidate not in seen:
                seen.add(candidate)
                out.append((source, candidate))
    return out
