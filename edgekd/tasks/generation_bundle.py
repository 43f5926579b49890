"""The app bundle of a decoder LM export (task text-generation), and its verification.

    export dir (decoder .pte) --> model/ + tokenizer/tokenizer.json + generation.json + calling code
                                  + verify/expected.json + README.md --> DIR, DIR.zip
    export dir (.litertlm)    --> model/ + generation.json + Kotlin (LiteRT-LM) + verify/expected.json + README.md

The app side is ExecuTorch's own: Kotlin `LlmModule` (Android), Swift `TextRunner` (iOS) and C++ `TextLLMRunner`,
which link the C++ tokenizer library pip ships as `pytorch-tokenizers`. The XNNPACK .pte is the same file on
Android and iOS. `generation.json` holds the prompt format the model was fine-tuned with (the chat template's user
turn and assistant header as a fixed prefix and suffix around the user's text; checked on every verification
prompt), the bos count the runner prepends, eos ids and the context.

`--verify` simulates the app: pytorch-tokenizers' C++ tokenizer reads the bundle's tokenizer.json and must give the
Hugging Face ids of every verification prompt (validation and test); those ids drive the bundled .pte in the
ExecuTorch runtime, greedy, and its tokens must be its reference's (the PyTorch student for an fp32 .pte, its
torchao-quantized reference for a quantized one) up to the first position where the reference's top-2 margin is
within twice the export gate's logit tolerance (a near-tie: either token is the model's answer).

A .litertlm carries its own tokenizer and start token, run by LiteRT-LM's engine (Kotlin `Engine` and `Session`,
Maven com.google.ai.edge.litertlm:litertlm-android). `--verify` runs the bundle in LiteRT-LM's Python runtime, the
same C++ engine: its start token and tokenizer must give the Hugging Face ids of every verification prompt, and its
greedy text must be the reference's (the PyTorch model for fp32, the model quantized as ai-edge-quantizer quantizes
it otherwise) but at a near-tie (targets/llm_litert.py, greedy_agreement). A Core ML package is not bundled: its
calling code could not be verified off a Mac.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PLATFORMS = ("android", "ios")
VERIFY_PROMPTS = 16      # generated through the .pte (the tokenizer check takes every validation and test prompt)
VERIFY_NEW_TOKENS = 16
SENTINEL = "EDGEKD_USER_TEXT"
RESOURCES = Path(__file__).parents[1] / "resources" / "bundle" / "generation"
CALLING_CODE = {"android": ("android/EdgekdGenerator.kt", "cpp/edgekd_generate.cpp"),
                "ios": ("ios/EdgekdGenerator.swift", "cpp/edgekd_generate.cpp")}
LITERT_FORMAT = "android/litert-lm"
LITERT_CODE = "android/EdgekdLiteRtLmGenerator.kt"


def make_decoder_bundle(artifact_dir: Path, platform: str, out: Path, recipe, export: dict,
                        export_input: dict) -> dict:
    """Write the bundle folder `out` and `out`.zip for `platform` from decoder export directory `artifact_dir`."""
    from edgekd.bundle import BundleError, _c_string, _kernels, copy_licenses, fill_template, finish_bundle
    from edgekd.manifest import write_stage
    from edgekd.tasks.generation import load_records

    fmt = export["params"]["format"]
    if fmt == "coreml-llm":
        raise BundleError(f"{artifact_dir} is a Core ML package, which edgekd does not bundle (its calling code could "
                          f"not be verified off a Mac); bundle the decoder's .pte for ios (ExecuTorch's TextRunner)")
    if platform not in PLATFORMS or (fmt == "litert-lm" and platform != "android"):
        raise BundleError(f"a decoder .pte runs on android or ios (ExecuTorch's LLM runners) and a .litertlm on "
                          f"android (LiteRT-LM's Kotlin API), not this {Path(export['artifact']).suffix} on "
                          f"{platform}; bundle the .pte export for ios")
    if getattr(recipe, "task", None) != "text-generation":
        raise BundleError(f"{artifact_dir} is a decoder LM export; pass the generation recipe it was exported with "
                          f"(--recipe RUN/recipe.yaml): its prompts become the bundle's verification set")
    data = load_records(recipe)
    if data.fingerprint()["sha256"] != export["inputs"]["data"]["sha256"]:
        raise BundleError(f"the recipe's data is not the data {artifact_dir} was exported with; pass that "
                          f"export's recipe with --recipe (its prompts become the bundle's verification set)")
    model, tokenizer = _source_model(artifact_dir, export)
    prompts = [r.prompt for r in data.validation + data.test]
    prefix, suffix, num_bos = prompt_format(tokenizer, prompts)
    if fmt == "litert-lm":
        return _litert_lm_bundle(artifact_dir, out, export, export_input, model, tokenizer, data, recipe.seed,
                                 prefix, suffix, num_bos)
    expected = _expected(export, model, tokenizer, data, recipe.seed, prefix, suffix, num_bos)
    generation = {"prompt_prefix": prefix, "prompt_suffix": suffix, "num_bos": num_bos,
                  "bos_id": tokenizer.bos_token_id, "eos_ids": export["metadata"].get("get_eos_ids", []),
                  "max_seq_len": export["max_seq_len"], "chat_template": tokenizer.chat_template,
                  "generation_config": json.loads((artifact_dir / "generation_config.json").read_text())}
    values = {"ARTIFACT": export["artifact"], "MAX_SEQ_LEN": str(export["max_seq_len"]), "NUM_BOS": str(num_bos),
              "C_PROMPT_PREFIX": _c_string(prefix), "C_PROMPT_SUFFIX": _c_string(suffix)}
    params = {"platform": platform, "format": "android/executorch-llm", "artifact": export["artifact"]}
    with write_stage(out, "bundle", params, {"export": export_input}) as stage:
        root = stage.path
        (root / "model").mkdir()
        shutil.copyfile(artifact_dir / export["artifact"], root / "model" / export["artifact"])
        (root / "tokenizer").mkdir()
        shutil.copyfile(artifact_dir / "tokenizer.json", root / "tokenizer" / "tokenizer.json")
        (root / "generation.json").write_text(json.dumps(generation, indent=2, ensure_ascii=False) + "\n")
        code = []
        for name in CALLING_CODE[platform]:
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_text(fill_template((RESOURCES / name).read_text(), values, name))
            code.append(name)
        (root / "verify").mkdir()
        (root / "verify" / "expected.json").write_text(json.dumps(expected, ensure_ascii=False) + "\n")
        copy_licenses(artifact_dir, root)
        kernels = _kernels(export, root / "model" / export["artifact"])
        (root / "README.md").write_text(_readme(platform, export, generation, code, expected))
        stage.extra.update({"task": "text-generation", "platform": platform, "format": params["format"],
                            "artifact": f"model/{export['artifact']}", "quant": export["quant"],
                            "max_seq_len": export["max_seq_len"], "runtime": export.get("runtime", {}),
                            "kernels": kernels, "calling_code": code, "verify_texts": len(expected["texts"]),
                            "verify_generations": len(expected["generations"])})
    return {**finish_bundle(out), "verify_texts": len(expected["texts"]),
            "verify_generations": len(expected["generations"])}


def _source_model(artifact_dir: Path, export: dict):
    """The model the .pte was exported from (checksum-verified) and its tokenizer, chat template included."""
    from edgekd.bundle import BundleError
    from edgekd.errors import StageError
    from edgekd.manifest import read_manifest, stage_input
    from edgekd.models import load_causal_lm, load_tokenizer

    source = export["inputs"]["model"]
    try:
        _, found = stage_input(Path(source["path"]), read_manifest(Path(source["path"]))["stage"])
    except StageError as exc:
        raise BundleError(f"the model {artifact_dir} was exported from cannot be read back to compute its "
                          f"reference tokens ({exc})") from None
    if found["sha256"] != source["sha256"]:
        raise BundleError(f"the model at {source['path']} changed since {artifact_dir} was exported from it; "
                          f"re-export, then bundle")
    return load_causal_lm(source["path"]), load_tokenizer(source["path"])


def prompt_format(tokenizer, prompts: list[str]) -> tuple[str, str, int]:
    """(prefix, suffix, bos count): the text around a user's prompt, and the bos tokens before it, that give the ids
    the model was fine-tuned on (edgekd.lm_data.prompt_ids) for every prompt; a BundleError when no fixed prefix
    and suffix do (a chat template that rewrites the user's text)."""
    from edgekd.bundle import BundleError
    from edgekd.lm_data import prompt_ids

    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
        prefix, found, suffix = rendered.partition(SENTINEL)
        if not found:
            raise BundleError("the chat template drops the user's text from its output; an app cannot build the "
                              "prompt from a fixed prefix and suffix")
    else:
        prefix, suffix = "", "\n"
    counts = set()
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        plain = tokenizer(prefix + prompt + suffix, add_special_tokens=False)["input_ids"]
        extra = len(ids) - len(plain)
        if extra < 0 or ids[extra:] != plain or ids[:extra] != [tokenizer.bos_token_id] * extra:
            raise BundleError(f"the prompt format is not a fixed prefix and suffix around the user's text for "
                              f"{prompt[:50]!r}; an app could not feed the model what it was fine-tuned on")
        counts.add(extra)
    if len(counts) > 1:
        raise BundleError(f"the tokenizer adds a different number of bos tokens to different prompts ({counts})")
    return prefix, suffix, counts.pop() if counts else 0


def _expected(export: dict, model, tokenizer, data, seed: int, prefix: str, suffix: str,
              num_bos: int) -> dict:
    """The verification set: every validation and test prompt with its Hugging Face ids; for a seeded, stratified
    sample of them the reference's greedy tokens and, per position, whether its top-2 margin is decisive."""

    from edgekd.compress.quant import get_spec
    from edgekd.lm_data import prompt_ids
    from edgekd.targets.llm_executorch import quantize_decoder

    records = data.validation + data.test
    spec = get_spec(export["quant"]["name"])
    reference = model if spec.is_float else quantize_decoder(model, spec)
    eos_ids = export["metadata"]["get_eos_ids"]  # what the .pte stops at
    tolerance = export["metrics"]["parity"]["logit_tolerance"]
    generations = _reference_generations(reference, tokenizer, records, seed, eos_ids, tolerance)
    return {"format": "android/executorch-llm", "quant": spec.name, "reference": "the PyTorch model" if spec.is_float
            else f"its torchao {spec.name} reference in PyTorch", "logit_tolerance": tolerance,
            "prompt_prefix": prefix, "prompt_suffix": suffix, "num_bos": num_bos,
            "texts": [r.prompt for r in records], "hf_ids": [prompt_ids(tokenizer, r.prompt) for r in records],
            "new_tokens": VERIFY_NEW_TOKENS, "generations": generations}


def verify_decoder_bundle(path: Path, manifest: dict) -> dict:
    """The app simulated here (see the module docstring); a BundleError, one line with counts, on a difference."""
    from edgekd.bundle import BundleError
    from edgekd.targets.llm_executorch import DecoderRunner, native_stderr_filtered

    expected = json.loads((path / "verify" / "expected.json").read_text(encoding="utf-8"))
    if manifest["format"] == LITERT_FORMAT:
        return _verify_litert_lm(path, manifest, expected)
    texts = expected["texts"]
    with native_stderr_filtered():  # the library logs its regex set-up to fd 2, from its import on
        from pytorch_tokenizers import CppHFTokenizer

        native = CppHFTokenizer()
        native.load(str(path / "tokenizer" / "tokenizer.json"))
        ids = [list(native.encode(expected["prompt_prefix"] + text + expected["prompt_suffix"], expected["num_bos"],
                                  0)) for text in texts]
    wrong = [i for i, (got, want) in enumerate(zip(ids, expected["hf_ids"])) if got != want]
    if wrong:
        raise BundleError(f"pytorch-tokenizers (the tokenizer library the app links) gives other ids than the model's "
                          f"tokenizer on {len(wrong)} of {len(texts)} verification prompts (first: "
                          f"{texts[wrong[0]][:60]!r})")
    runner = DecoderRunner(path / manifest["artifact"], 1)
    equal, near_ties = 0, 0
    for generation in expected["generations"]:
        got, _ = runner.generate(ids[generation["text"]], expected["new_tokens"])
        want, decisive = generation["tokens"], generation["decisive"]
        fork = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if fork is None and len(got) == len(want):
            equal += 1
        elif fork is not None and not decisive[fork]:
            near_ties += 1  # both tokens are within the gate's tolerance of the top: the reference's own near-tie
        else:
            where = fork if fork is not None else min(len(got), len(want))
            raise BundleError(f"the bundled model fed by the app's tokenizer generates other tokens than "
                              f"{expected['reference']} on prompt {generation['text'] + 1} (from token {where} of "
                              f"{len(want)}, where the reference's choice is decisive)")
    n = len(expected["generations"])
    return {"bundle": str(path), "files": len(manifest["files"]), "texts": len(texts), "tokenizer": "exact",
            "tokenizer_library": "pytorch-tokenizers", "texts_are": "validation and test prompts",
            "model": f"greedy tokens equal those of {expected['reference']} on {equal} of {n} prompts"
                     + (f", the other {near_ties} forked at a near-tie" if near_ties else "")}


def _readme(platform: str, export: dict, generation: dict, code: list[str], expected: dict) -> str:
    runtime = {"android": "Maven `org.pytorch:executorch-android` (`LlmModule`)",
               "ios": "the Swift package `ExecuTorchLLM` (`TextRunner`), with `ExecuTorch` and its XNNPACK backend"}
    lines = [
        f"# {export['artifact']} for {platform}",
        "",
        f"A decoder LM ({export['quant']['name']}, context {export['max_seq_len']} tokens) exported by edgekd to "
        f"ExecuTorch with XNNPACK and a static KV cache. Runtime: {runtime[platform]}; the C++ runner "
        f"`TextLLMRunner` in `cpp/`. The same `.pte` runs on Android and iOS.",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `model/{export['artifact']}` | the program ({export.get('size_bytes', 0) / 1e6:.1f} MB) |",
        "| `tokenizer/tokenizer.json` | the Hugging Face tokenizer, read by ExecuTorch's tokenizer library |",
        "| `generation.json` | prompt prefix and suffix, bos count, eos ids, context, chat template, generation "
        "config |",
        *[f"| `{name}` | calling code: load, generate greedily, stream tokens |" for name in code],
        "| `verify/expected.json` | what `edgekd bundle --verify` checks |",
        "",
        "The prompt is `prompt_prefix + user text + prompt_suffix` (generation.json), with `num_bos` "
        f"({generation['num_bos']}) bos tokens: the format the model was fine-tuned with. Generation stops at an "
        f"eos id ({generation['eos_ids']}) or when the context is full.",
        "",
        f"`edgekd bundle --verify THIS_FOLDER` checks every file's checksum; that the tokenizer library gives the "
        f"model's tokenizer's ids on {len(expected['texts'])} prompts; and that the model, fed those ids, generates "
        f"{expected['reference']}'s greedy tokens on {len(expected['generations'])} of them.",
        "",
    ]
    return "\n".join(lines)


def _reference_generations(reference, tokenizer, records: list, seed: int, eos_ids, tolerance: float) -> list:
    """For a seeded, stratified sample of `records`: the reference's greedy tokens (stopping at `eos_ids`) and, per
    position, whether its top-2 margin is decisive at the export gate's `tolerance`."""
    import torch

    from edgekd.lm_data import prompt_ids
    from edgekd.sample import stratified_sample
    from edgekd.targets.llm_executorch import decisive_positions, reference_generate

    generations = []
    for i in sorted(stratified_sample([str(r.label) for r in records], VERIFY_PROMPTS, seed, "bundle")):
        ids = prompt_ids(tokenizer, records[i].prompt)
        tokens = reference_generate(reference, ids, VERIFY_NEW_TOKENS, eos_ids)
        with torch.no_grad():  # the next-token logits along its own greedy path, one forward
            logits = reference(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].float()
        generations.append({"text": i, "tokens": tokens, "decisive": decisive_positions(logits, tolerance)})
    return generations


def _litert_lm_bundle(artifact_dir: Path, out: Path, export: dict, export_input: dict, model, tokenizer, data,
                      seed: int, prefix: str, suffix: str, num_bos: int) -> dict:
    """The android bundle of a .litertlm: the file, generation.json, Kotlin calling code, verify/expected.json."""
    from edgekd.bundle import BundleError, copy_licenses, fill_template, finish_bundle
    from edgekd.compress.quant import get_spec
    from edgekd.lm_data import prompt_ids
    from edgekd.manifest import write_stage
    from edgekd.targets.llm_litert import litert_reference, prefix_texts

    start = export.get("start_token_id")
    # LiteRT-LM's prefill puts its start token before the text: a prompt format that writes it as text (SmolLM2's
    # template begins with its bos) leaves it out, a tokenizer that adds it (num_bos 1) has it from the runtime
    start_text = tokenizer.decode([start]) if start is not None else ""
    if start is not None and num_bos == 0 and prefix.startswith(start_text):
        prefix = prefix[len(start_text):]
    elif num_bos != (start is not None):
        raise BundleError(f"the model's prompts begin with {num_bos} bos tokens and the .litertlm's start token is "
                          f"{start}: LiteRT-LM would not feed the model what it was fine-tuned on; re-export it")
    records = data.validation + data.test
    spec = get_spec(export["quant"]["name"])
    reference = model if spec.is_float else litert_reference(model, spec)
    eos_ids, tolerance = export["eos_ids"], export["metrics"]["parity"]["logit_tolerance"]
    generations = _reference_generations(reference, tokenizer, records, seed, eos_ids, tolerance)
    for generation in generations:  # LiteRT-LM gives text: what of the path it shows
        generation["prefix_texts"], generation["stopped"] = prefix_texts(
            tokenizer, generation["tokens"], export.get("stop_sequences") or [[i] for i in eos_ids])
    expected = {"format": LITERT_FORMAT, "quant": spec.name, "logit_tolerance": tolerance,
                "reference": "the PyTorch model" if spec.is_float else f"its ai-edge-quantizer {spec.name} reference "
                             f"in PyTorch", "prompt_prefix": prefix, "prompt_suffix": suffix, "start_token_id": start,
                "texts": [r.prompt for r in records], "hf_ids": [prompt_ids(tokenizer, r.prompt) for r in records],
                "new_tokens": VERIFY_NEW_TOKENS, "generations": generations}
    generation = {"prompt_prefix": prefix, "prompt_suffix": suffix, "start_token_id": start, "eos_ids": eos_ids,
                  "stop_sequences": export.get("stop_sequences", []), "max_seq_len": export["max_seq_len"],
                  "chat_template": tokenizer.chat_template}
    artifact = export["artifact"]
    values = {"ARTIFACT": artifact, "MAX_SEQ_LEN": str(export["max_seq_len"])}
    params = {"platform": "android", "format": LITERT_FORMAT, "artifact": artifact}
    with write_stage(out, "bundle", params, {"export": export_input}) as stage:
        root = stage.path
        (root / "model").mkdir()
        shutil.copyfile(artifact_dir / artifact, root / "model" / artifact)
        (root / "generation.json").write_text(json.dumps(generation, indent=2, ensure_ascii=False) + "\n")
        (root / "android").mkdir()
        (root / LITERT_CODE).write_text(fill_template((RESOURCES / LITERT_CODE).read_text(), values, LITERT_CODE))
        (root / "verify").mkdir()
        (root / "verify" / "expected.json").write_text(json.dumps(expected, ensure_ascii=False) + "\n")
        copy_licenses(artifact_dir, root)
        (root / "README.md").write_text(_litert_readme(export, generation, expected))
        stage.extra.update({"task": "text-generation", "platform": "android", "format": LITERT_FORMAT,
                            "artifact": f"model/{artifact}", "quant": export["quant"],
                            "max_seq_len": export["max_seq_len"], "runtime": export.get("runtime", {}),
                            "calling_code": [LITERT_CODE], "verify_texts": len(expected["texts"]),
                            "verify_generations": len(generations)})
    return {**finish_bundle(out), "verify_texts": len(expected["texts"]), "verify_generations": len(generations)}


def _verify_litert_lm(path: Path, manifest: dict, expected: dict) -> dict:
    """The .litertlm in LiteRT-LM as the app runs it: start token + tokenizer ids, then greedy text."""
    from edgekd.bundle import BundleError
    from edgekd.targets.llm_litert import LiteRTLMRunner, greedy_agreement

    runner = LiteRTLMRunner(path / manifest["artifact"], threads=1, max_seq_len=manifest["max_seq_len"])
    start = [] if runner.bos_id is None else [runner.bos_id]
    prompts = [expected["prompt_prefix"] + text + expected["prompt_suffix"] for text in expected["texts"]]
    wrong = [i for i, (prompt, want) in enumerate(zip(prompts, expected["hf_ids"]))
             if start + runner.tokenize(prompt) != want]
    if runner.bos_id != expected["start_token_id"] or wrong:
        raise BundleError(f"LiteRT-LM's start token ({runner.bos_id}) and tokenizer give other ids than the model's "
                          f"tokenizer on {len(wrong) or len(prompts)} of {len(prompts)} verification prompts (first: "
                          f"{expected['texts'][(wrong or [0])[0]][:60]!r})")
    equal, near_ties = 0, 0
    for generation in expected["generations"]:
        text = runner.generate_text(prompts[generation["text"]], expected["new_tokens"] + 2)
        agreement = greedy_agreement(text, generation["prefix_texts"], generation["stopped"], generation["decisive"])
        if agreement["decisive_fork"]:
            raise BundleError(f"the bundled model in LiteRT-LM generates another text than {expected['reference']} "
                              f"on prompt {generation['text'] + 1} (from token {agreement['fork']} of "
                              f"{len(generation['tokens'])}, where the reference's choice is decisive)")
        equal += agreement["equal"]
        near_ties += not agreement["equal"]
    n = len(expected["generations"])
    return {"bundle": str(path), "files": len(manifest["files"]), "texts": len(prompts), "tokenizer": "exact",
            "tokenizer_library": "LiteRT-LM's own (in the .litertlm)", "texts_are": "validation and test prompts",
            "model": f"greedy text equal to that of {expected['reference']} on {equal} of {n} prompts"
                     + (f", the other {near_ties} forked at a near-tie" if near_ties else "")}


def _litert_readme(export: dict, generation: dict, expected: dict) -> str:
    artifact = export["artifact"]
    lines = [
        f"# {artifact} for android (LiteRT-LM)",
        "",
        f"A decoder LM ({export['quant']['name']}, context {export['max_seq_len']} tokens) exported by edgekd with "
        f"litert-torch to a LiteRT-LM bundle: the model, its tokenizer and its start and stop tokens in one file. "
        f"Runtime: Maven `com.google.ai.edge.litertlm:litertlm-android` (`Engine`, `Session`).",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `model/{artifact}` | the model, tokenizer and metadata ({export.get('size_bytes', 0) / 1e6:.1f} MB) |",
        "| `generation.json` | prompt prefix and suffix, start token, eos ids and stop sequences, context, chat "
        "template |",
        f"| `{LITERT_CODE}` | calling code: load, generate greedily, stream text |",
        "| `verify/expected.json` | what `edgekd bundle --verify` checks |",
        "",
        "The prompt is `prompt_prefix + user text + prompt_suffix` (generation.json), given to a `Session` as text: "
        f"LiteRT-LM puts the start token ({generation['start_token_id']}) before it, which together is the format "
        "the model was fine-tuned with. The calling code uses a Session, not a Conversation: a Conversation renders "
        "the chat template with LiteRT-LM's own template engine, which `--verify` does not check.",
        "",
        f"`edgekd bundle --verify THIS_FOLDER` checks every file's checksum; that LiteRT-LM's start token and "
        f"tokenizer give the model's tokenizer's ids on {len(expected['texts'])} prompts; and that the model in "
        f"LiteRT-LM generates {expected['reference']}'s greedy text on {len(expected['generations'])} of them.",
        "",
    ]
    return "\n".join(lines)
