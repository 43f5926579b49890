"""The teacher's top-k per label position, computed once and kept in safetensors, keyed by teacher and data.

Layout of a cache file (`LAYOUT`), P = number of label positions over the whole data:

- `values` [P, k] float16: the teacher's log-probabilities (log_softmax over the full vocabulary at T = 1) of
  its k most likely next tokens, highest first. Temperature-free: one file serves every temperature and loss.
- `indices` [P, k] int32: those token ids (int32 holds any vocabulary; widened to int64 on use).
- `offsets` [N + 1] int64: example i owns rows offsets[i]:offsets[i + 1], one per position t with
  labels[t + 1] != -100 (HF shift: logits at t predict token t + 1), in increasing t.

Only label positions are stored: prompts and padding carry no loss. Size for a realistic case, 1,300 examples x
40 completion tokens at k = 64: 52,000 rows x 64 x (2 + 4) bytes = 20.0 MB, where the full fp32 logits of
SmolLM2's 49,152-token vocabulary at the same positions would be 52,000 x 49,152 x 4 bytes = 10.2 GB.
fp16 log-probabilities are accurate enough: on SmolLM2-135M-Instruct (the built-in GGUF, dequantized) as teacher
and a 15-of-30-layer cut of it as student, over four finance sentences, the loss from fp16 values differed from
the fp32 one by at most 2e-4 relative (forward, reverse and skew KL, T = 1 and 2, k = 16 and 64); the mean rest
mass there was 0.24 at k = 16 and 0.14 at k = 64. `tests/test_lm_distill.py` checks 1e-3 on a tiny decoder.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgekd.errors import DataError, RecipeError, StageError
from edgekd.lm_metrics import label_logits

LAYOUT = "edgekd-lm-topk-v1: values [P,k] f16 log-probs, indices [P,k] i32, offsets [N+1] i64; label positions"


def as_records(data) -> list[dict]:
    """Examples as {'input_ids', 'labels', 'attention_mask'} lists of ints, unpadded.

    `data` is either records (dicts of 1-D lists or tensors) or batches in the shared contract: dicts of
    `input_ids` [B, L], `attention_mask` [B, L] (1 = real token, right padding), `labels` [B, L].
    """
    records = []
    for item in data:
        if torch.as_tensor(item["input_ids"]).dim() == 1:   # one record: a batch of one
            item = {key: torch.as_tensor(item[key])[None] for key in ("input_ids", "labels", "attention_mask")
                    if key in item}
        records.extend(_rows(item))
    if not records:
        raise DataError("the LM data holds no examples; give records with input_ids and labels")
    return records


def _rows(batch: dict) -> Iterable[dict]:
    if "labels" not in batch:
        raise DataError("an LM example has no 'labels'; encode prompts as -100 and completion tokens as their ids")
    ids, labels = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])
    mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids)))
    if ids.shape != labels.shape or ids.shape != mask.shape:
        raise DataError(f"input_ids {tuple(ids.shape)}, labels {tuple(labels.shape)} and attention_mask "
                        f"{tuple(mask.shape)} differ in shape; give one label per token (-100 for no loss)")
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        n = int(row_mask.sum())
        if not bool(row_mask[:n].all()):
            raise DataError("an attention_mask has a 0 before a 1; pad on the right (tokenizer.padding_side='right')")
        yield {"input_ids": row_ids[:n].tolist(), "labels": row_labels[:n].tolist(), "attention_mask": [1] * n}


@dataclass
class TopK:
    """A loaded cache (module docstring for the layout)."""
    values: torch.Tensor    # [P, k] float16
    indices: torch.Tensor   # [P, k] int32
    offsets: torch.Tensor   # [N + 1] int64

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def rows(self, index: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows of examples `index` [B], in their order and then left to right, as label_logits
        gives the student's: (values [N, k] float32, indices [N, k] int64). `labels` [B, L] checks the counts."""
        spans = []
        for row, i in enumerate(index.tolist()):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            if int((labels[row, 1:] != -100).sum()) != end - start:
                raise StageError(f"example {i} has {int((labels[row, 1:] != -100).sum())} label positions but the "
                                 f"teacher cache holds {end - start}; the cache belongs to other data: delete it and "
                                 f"rerun")
            spans.append(torch.arange(start, end))
        take = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        return self.values[take].float(), self.indices[take].long()


def record_key(record: dict) -> str:
    """One record's identity in a cache file (its tokens and label positions), for reuse across files."""
    return hashlib.sha256(json.dumps([record["input_ids"], record["labels"]]).encode()).hexdigest()[:20]


def cache_key(teacher_digest: str, records: list[dict], k: int) -> str:
    digest = hashlib.sha256(teacher_digest.encode())
    digest.update(json.dumps([LAYOUT, k, [[r["input_ids"], r["labels"]] for r in records]]).encode())
    return digest.hexdigest()[:24]


def teacher_topk(teacher, records: list[dict], k: int, teacher_digest: str, cache_dir: Path,
                 batch_size: int = 16) -> tuple[TopK, bool]:
    """The teacher's top-k at every label position of `records`, from the cache when present; (TopK, hit). On a
    miss, the records another cache file of the same teacher and k holds are taken from it, not recomputed."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 0 < k <= vocab:
        raise RecipeError(f"top-k {k} must be in 1..{vocab} (the teacher's vocabulary); 64 is a good default")
    path = Path(cache_dir) / f"teacher-topk-{cache_key(teacher_digest, records, k)}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("layout") == LAYOUT:
                return TopK(f.get_tensor("values"), f.get_tensor("indices"), f.get_tensor("offsets")), True
    keys = [record_key(r) for r in records]
    top = _assemble(records, keys, _cached_rows(Path(cache_dir), teacher_digest, k, set(keys)), teacher, k,
                    batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"values": top.values, "indices": top.indices, "offsets": top.offsets}, str(tmp),
              metadata={"layout": LAYOUT, "k": str(k), "vocab": str(vocab), "examples": str(len(records)),
                        "teacher": teacher_digest, "record_keys": json.dumps(keys)})
    os.replace(tmp, path)
    return top, False


def _cached_rows(cache_dir: Path, teacher_digest: str, k: int, wanted: set[str]) -> dict:
    """record key -> (values, indices) of the records in `wanted` that another cache file of this teacher and k
    already holds (another sample of the same data, a record list grown by a few): only the rest is computed."""
    found = {}
    for file in sorted(cache_dir.glob("teacher-topk-*.safetensors")) if cache_dir.is_dir() else ():
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("layout"), meta.get("teacher"), meta.get("k")) != (LAYOUT, teacher_digest, str(k)):
                continue
            keys = json.loads(meta["record_keys"])
            if not wanted.intersection(keys):
                continue
            values, indices, offsets = f.get_tensor("values"), f.get_tensor("indices"), f.get_tensor("offsets")
        for i, key in enumerate(keys):
            if key in wanted and key not in found:
                start, end = int(offsets[i]), int(offsets[i + 1])
                found[key] = (values[start:end], indices[start:end])
    return found


def _assemble(records: list[dict], keys: list[str], found: dict, teacher, k: int, batch_size: int) -> TopK:
    """The cache of `records` in their order: rows from `found`, the teacher's forward for the others."""
    missing = [i for i, key in enumerate(keys) if key not in found]
    if len(missing) == len(records):   # nothing cached: the computed cache is already in order
        return _compute(teacher, records, k, batch_size)
    if missing:
        fresh = _compute(teacher, [records[i] for i in missing], k, batch_size)
        for j, i in enumerate(missing):
            start, end = int(fresh.offsets[j]), int(fresh.offsets[j + 1])
            found[keys[i]] = (fresh.values[start:end], fresh.indices[start:end])
    rows = [found[key] for key in keys]
    counts = torch.tensor([0] + [len(values) for values, _ in rows], dtype=torch.int64)
    return TopK(torch.cat([v for v, _ in rows]).contiguous(), torch.cat([i for _, i in rows]).contiguous(),
                counts.cumsum(0))


@torch.no_grad()
def _compute(teacher, records: list[dict], k: int, batch_size: int) -> TopK:
    from tqdm.auto import tqdm

    was_training = teacher.training
    teacher.eval()
    values, indices, counts = [], [], [0]
    for start in tqdm(range(0, len(records), batch_size), desc="teacher top-k", unit="batch"):
        chunk = records[start:start + batch_size]
        length = max(len(r["input_ids"]) for r in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.int64)   # right padding; masked, so any id does
        mask = torch.zeros(len(chunk), length, dtype=torch.int64)
        for row, r in enumerate(chunk):
            ids[row, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[row, :len(r["input_ids"])] = 1
        labels = torch.full((len(chunk), length), -100, dtype=torch.int64)
        for row, r in enumerate(chunk):
            labels[row, :len(r["labels"])] = torch.tensor(r["labels"])
        logits, _, rows = label_logits(teacher, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        top = logits.log_softmax(-1).topk(k, -1)                                           # [N, k], row by row
        values.append(top.values.half().cpu())
        indices.append(top.indices.int().cpu())
        counts += torch.bincount(rows.cpu(), minlength=len(chunk)).tolist()
    teacher.train(was_training)
    return TopK(torch.cat(values).contiguous(), torch.cat(indices).contiguous(),
                torch.tensor(counts, dtype=torch.int64).cumsum(0))


def teacher_completions(teacher, tokenizer, prompts: list[str], max_new_tokens: int, teacher_digest: str,
                        cache_dir: Path, batch_size: int = 16) -> list[str]:
    """The teacher's greedy completion of each prompt (special tokens dropped), what an unlabelled prompt is
    trained on; kept in cache_dir per teacher and max_new_tokens, prompt by prompt, so another sample of the same
    file (another seed) generates only the prompts it has not seen."""
    from edgekd.lm_data import Record
    from edgekd.lm_metrics import greedy_completions

    path = Path(cache_dir) / f"teacher-completions-{teacher_digest[:24]}-{max_new_tokens}.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        from tqdm.auto import tqdm

        was_training = teacher.training
        teacher.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for n, start in enumerate(tqdm(range(0, len(missing), batch_size), desc="teacher completions",
                                           unit="batch")):
                chunk = missing[start:start + batch_size]
                known.update(zip(chunk, greedy_completions(teacher, tokenizer, [Record(p, "") for p in chunk],
                                                           max_new_tokens, batch_size)))
                if n % 32 == 31 or start + batch_size >= len(missing):  # a killed run keeps what it generated
                    tmp = path.with_suffix(f".tmp-{os.getpid()}")
                    tmp.write_text(json.dumps(known))
                    os.replace(tmp, path)
        teacher.train(was_training)
    return [known[p] for p in prompts]
