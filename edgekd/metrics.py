"""Classification metrics shared by every stage."""
from __future__ import annotations

import numpy as np


def classification_metrics(logits: np.ndarray, labels, reference_logits: np.ndarray | None = None,
                           bins: int = 10) -> dict:
    """accuracy, macro-F1, expected calibration error, and top-1 agreement with a reference model."""
    from sklearn.metrics import f1_score

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    pred = logits.argmax(-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    confidence = probs.max(-1)
    # ECE: |accuracy - confidence| per confidence bin, weighted by the bin's share (Guo et al., 2017).
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - confidence[in_bin].mean())
    metrics = {
        "accuracy": float((pred == labels).mean()),
        # Over the classes that occur (in labels or predictions): an absent class is not an F1 of 0.
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "ece": float(ece),
        "n": int(len(labels)),
    }
    if reference_logits is not None:
        metrics["agreement"] = float((np.asarray(reference_logits).argmax(-1) == pred).mean())
    return metrics
