"""Quantization-aware distillation: when post-training quantization loses too much, the student
learns weights that survive it.

torchao's QAT swaps every Linear (and, when the spec quantizes them, every Embedding) for a fake
quantized one built from the very torchao configs the exporter realizes (int8 / int4 weights per
channel or group, dynamic per-token int8 activations, int8 / int4 embedding rows). The student then
trains under the distillation loss from the cached teacher logits, and the fake quantizers are
swapped back out: what is saved is a float model whose weights sit where the backend's own quantizer
puts them at export (Jacob et al., 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"; the straight-through estimator of Bengio et al., 2013).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from edgekd.compress.quant import QuantSpec, embedding_config, embedding_widths, linear_config
from edgekd.errors import RecipeError


def qat_supported(spec: QuantSpec) -> bool:
    """int8 / int4 weights with dynamic or no activation quantization: what torchao's QAT mirrors.
    Static activations are calibrated by PT2E observers, for which there is no fake-quantized twin here."""
    return spec.weights in ("int8", "int4") and spec.activations in ("dynamic", "none")


def quantization_aware(job, model: torch.nn.Module, spec: QuantSpec, epochs: float,
                       checkpoints: Path | None = None) -> torch.nn.Module:
    """A copy of `model` distilled `epochs` from the teacher under `spec`'s fake quantization (job: a
    compress.Compression). With `checkpoints`, the training resumes from the newest one there."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if not qat_supported(spec):
        raise RecipeError(f"quantization-aware training covers int8 and int4 weights with dynamic or no activation "
                          f"quantization, not {spec.name}; choose another spec or set compress.qat_epochs: 0")
    model = copy.deepcopy(model)
    is_linear = lambda module, fqn: isinstance(module, torch.nn.Linear)  # noqa: E731
    quantize_(model, QATConfig(linear_config(model, spec), step="prepare"), filter_fn=is_linear)
    for width, only in embedding_widths(model) if spec.embeddings else ():
        quantize_(model, QATConfig(embedding_config(spec.embeddings, width), step="prepare"), filter_fn=only)
    model = job.distill_from_teacher(model, epochs, checkpoints)
    # No base config: the convert step only swaps the fake-quantized modules back, keeping the trained weights.
    quantize_(model, QATConfig(step="convert"),
              filter_fn=lambda module, fqn: isinstance(module, (torch.nn.Linear, torch.nn.Embedding)))
    return model.eval()
