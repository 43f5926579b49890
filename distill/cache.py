"""Teacher logit cache: run the teacher once over the transfer set, keyed by teacher and data checksums."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edgekd.distill.training import predict_logits


def cache_key(teacher_digest: str, texts: list[str], max_length: int) -> str:
    digest = hashlib.sha256(teacher_digest.encode())
    digest.update(json.dumps([max_length, texts]).encode())
    return digest.hexdigest()[:24]


def teacher_logits(teacher, tokenizer, texts: list[str], max_length: int, teacher_digest: str,
                   cache_dir: Path) -> tuple[np.ndarray, bool]:
    """Logits [n, C] of the teacher on `texts`, from the cache when present; returns (logits, hit).

    `teacher`: the model, or a function that returns it, called only when the cache has no logits."""
    path = Path(cache_dir) / f"teacher-logits-{cache_key(teacher_digest, texts, max_length)}.safetensors"
    if path.is_file():
        return load_file(path)["logits"].numpy(), True
    if not isinstance(teacher, torch.nn.Module):
        teacher = teacher()
    logits = predict_logits(teacher, tokenizer, texts, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"logits": torch.from_numpy(logits).contiguous()}, str(tmp))
    os.replace(tmp, path)
    return logits, False
