"""Transfer-set augmentation and the KD loss on teacher-only (unlabelled) examples."""
from __future__ import annotations

import torch

from edgekd.distill.augment import augment
from edgekd.distill.losses import soft_label_kd

TEXTS = ["Kestrel Mining raised its dividend after a record quarter for copper sales",
         "Norlund Bank will report third-quarter results on 14 November",
         "Shares of Halvorsen Freight fell 7% after the company cut its outlook"]


def test_augment_is_deterministic_new_and_bounded():
    first = augment(TEXTS, 5, "[MASK]", seed=3)
    assert first == augment(TEXTS, 5, "[MASK]", seed=3)
    assert first != augment(TEXTS, 5, "[MASK]", seed=4)
    assert 0 < len(first) <= 5 * len(TEXTS)
    assert len(set(first)) == len(first) and not set(first) & set(TEXTS)
    vocabulary = {w for t in TEXTS for w in t.split()} | {"[MASK]"}
    assert all(set(text.split()) <= vocabulary for text in first)  # only corpus words and the mask
    assert any("[MASK]" in text for text in first)
    assert any(len(text.split()) <= 5 for text in first)            # n-gram samples occur


def test_augment_zero_copies_is_empty():
    assert augment(TEXTS, 0, "[MASK]", seed=0) == []


def test_unlabelled_examples_only_feed_the_soft_term():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, -100, 2, -100])
    mixed = soft_label_kd(student, teacher, labels, temperature=2.0, alpha=0.5)
    soft = soft_label_kd(student, teacher, labels, temperature=2.0, alpha=1.0)
    ce = torch.nn.functional.cross_entropy(student[[0, 2]], labels[[0, 2]])
    assert torch.allclose(mixed, 0.5 * soft + 0.5 * ce)
    none_labelled = torch.full((4,), -100)
    assert torch.allclose(soft_label_kd(student, teacher, none_labelled, 2.0, 0.5), soft)
