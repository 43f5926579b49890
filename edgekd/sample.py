"""Seeded, stratified samples of a split: calibration texts, parity texts, pruning and evaluation texts.

Data files are often sorted by label, so the first N rows can hold one or two classes. A sample
here is a prefix of one fixed stratified ordering of the split's rows:

1. one row of every label first (largest labels first), so n >= number of labels covers them all;
2. then the other rows by systematic position: a label's j-th row sits at (j + 0.5) / size, so any
   prefix holds each label in proportion to its share of the split (within one row).

Within a label rows are ordered by a SHA-256 of (purpose, seed, row index): the same indices on
every machine and Python version, no RNG stream to drift, and a prefix property for free: the
sample of 100 is the first 100 of the sample of 200 (compress evaluates on the calibration the
export uses).
"""
from __future__ import annotations

import hashlib
import json

SCHEME = "stratified-prefix-v1"


def _key(purpose: str, seed: int, item) -> bytes:
    return hashlib.sha256(f"{purpose}\0{seed}\0{item}".encode()).digest()


def stratified_order(labels: list[str], seed: int, purpose: str) -> list[int]:
    """Every row index of a split with `labels`, in the order samples take them."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for rows in by_label.values():
        rows.sort(key=lambda i: _key(purpose, seed, i))
    # Round one: the first row of each label, largest labels first (ties in a seeded order).
    rank = sorted(by_label, key=lambda label: (-len(by_label[label]), _key(purpose, seed, f"label:{label}")))
    order = [by_label[label][0] for label in rank]
    # The rest: the j-th row of a label of m rows at position (j + 0.5) / m, ties in label rank.
    rest = [((j + 0.5) / len(by_label[label]), r, i)
            for r, label in enumerate(rank) for j, i in enumerate(by_label[label]) if j > 0]
    return order + [i for _, _, i in sorted(rest)]


def stratified_sample(labels: list[str], n: int, seed: int, purpose: str) -> list[int]:
    """The indices of `n` rows (all of them when n >= len(labels)), stratified by label."""
    return stratified_order(labels, seed, purpose)[:max(0, n)]


def checksum(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()


class Samples:
    """Draws samples from a dataset's splits with its seed and keeps a record of each for the manifest."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.records: dict[str, dict] = {}

    def split(self, name: str, n: int, purpose: str):
        """A Split of `n` rows of split `name` for `purpose`; the draw is recorded under `purpose`."""
        from edgekd.data import Split

        source = getattr(self.dataset, name)
        seed = self.dataset.seed
        indices = stratified_sample(source.labels, n, seed, purpose)
        self.records[purpose] = {"split": name, "rows": len(indices), "of": len(source), "seed": seed,
                                 "scheme": SCHEME, "labels": len({source.labels[i] for i in indices}),
                                 "indices_sha256": checksum(indices)}
        return Split([source.texts[i] for i in indices], [source.labels[i] for i in indices])
