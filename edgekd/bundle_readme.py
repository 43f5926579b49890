"""The README.md of a bundle: how an app developer adds it to a Gradle, Xcode or CMake project."""
from __future__ import annotations

INTEGRATION = {
    "android/executorch": """\
1. Gradle (`app/build.gradle.kts`): `implementation("org.pytorch:executorch-android:{executorch}")` — the
   ExecuTorch release this `.pte` was exported and checked with; its AAR carries the runtime, the XNNPACK
   backend and the portable, optimized and quantized kernels. A runtime you build yourself must register
   {kernel_line}
2. Tokenizer: point the module's CMake at `android/CMakeLists.txt`
   (`android {{ externalNativeBuild {{ cmake {{ path = file("<bundle>/android/CMakeLists.txt") }} }} }}`); it builds
   `libedgekd_tokenizer.so` from `tokenizer/c/` and `android/edgekd_jni.c`.
3. Kotlin: copy `android/*.kt` into your sources (package `ai.edgekd`). `Module.load` takes a file path: copy
   `model/{artifact}` from `assets/` to `context.filesDir` once, then
   `EdgekdClassifier(path).classify(text)` returns `(label, probabilities)`.""",
    "android/litert": """\
1. Gradle: `implementation("com.google.ai.edge.litert:litert:<version>")` (LiteRT; exported and checked here
   with ai-edge-litert {litert}). Keep the model uncompressed in the APK: `androidResources {{ noCompress += "tflite" }}`.
2. Tokenizer: point the module's CMake at `android/CMakeLists.txt` (builds `libedgekd_tokenizer.so` from
   `tokenizer/c/` and `android/edgekd_jni.c`).
3. Kotlin: copy `android/*.kt` into your sources (package `ai.edgekd`);
   `EdgekdClassifier(File(path)).classify(text)` returns `(label, probabilities)`. The model runs through its
   `serving_default` signature (inputs `input_ids`, `attention_mask`; output `{output_name}`).""",
    "ios/coreml": """\
1. Xcode: add `model/{artifact}` to the app target (Xcode compiles it to `{stem}.mlmodelc`); deployment
   target {deployment} or later.
2. Tokenizer: add `tokenizer/c/edgekd_tokenizer.c` to the target and the folder `ios/` (its `module.modulemap`
   declares the C module `EdgekdTokenizerC`) to Build Settings > Swift Compiler > Import Paths, with
   `tokenizer/c` in Header Search Paths.
3. Swift: add `ios/*.swift`; `try EdgekdClassifier(compiledModelURL: url).classify(text)` returns
   `(label, probabilities)`.""",
    "ios/executorch-coreml": """\
1. Swift Package Manager: `https://github.com/pytorch/executorch`, branch `swiftpm-{executorch}`; link the
   products `executorch` and `backend_coreml` (add `-all_load` to Other Linker Flags so the backend and
   kernels register). {kernel_line}
2. Tokenizer: add `tokenizer/c/edgekd_tokenizer.c` to the target and the folder `ios/` (its `module.modulemap`
   declares `EdgekdTokenizerC`) to Swift Compiler > Import Paths, with `tokenizer/c` in Header Search Paths.
3. Swift: add `ios/*.swift` and `model/{artifact}` to the target;
   `try EdgekdClassifier(modelPath: path).classify(text)` returns `(label, probabilities)`.""",
    "embedded/tflm": """\
1. CMake (or your firmware build): compile `tokenizer/c/edgekd_tokenizer.c`, `model/model_data.cc` and
   `embedded/classifier.cc`, with `tokenizer/c`, `model` and `embedded` on the include path, and link TFLite
   Micro (built for your board; CMSIS-NN or ESP-NN kernels where there are some):

       add_library(edgekd_classifier STATIC tokenizer/c/edgekd_tokenizer.c model/model_data.cc embedded/classifier.cc)
       target_include_directories(edgekd_classifier PUBLIC tokenizer/c model embedded)
       target_link_libraries(edgekd_classifier PUBLIC tflite-micro)

2. `ClassifierInit()` once, then `Classify(text, length, probabilities)` returns the label index
   (`kClassifierLabelNames[i]`). Memory: the tensor arena is `kTensorArenaSize` = {arena} bytes (static,
   in `classifier.cc`), the model {model_bytes} bytes of flash, the tokenizer's tables
   {table_bytes_kb} of flash (source size; const data) and its workspace about {workspace} bytes of RAM.
   `RegisterModelOps` registers exactly the {op_count} ops this model uses.""",
    "embedded/executorch-portable": """\
1. Build the ExecuTorch runtime {executorch} for your board with portable kernels, selected to this
   model's operators: `-DEXECUTORCH_SELECT_OPS_LIST="$(cat model/selected_operators.txt)"`. {kernel_line}
2. Compile `tokenizer/c/edgekd_tokenizer.c` and `embedded/classifier.cc` with `tokenizer/c` and `embedded`
   on the include path; link `executorch`, `extension_module`, `extension_tensor` and the selected kernels.
3. `ClassifierInit()` once (it loads `{artifact}` by path), then `Classify(text, length, probabilities)`
   returns the label index (`kClassifierLabelNames[i]`).""",
}


def render(platform: str, fmt: str, export: dict, values: dict, kernels: dict, tables: dict, code: list[str]) -> str:
    runtime = export.get("runtime", {})
    delegation = export.get("delegation", {})
    quant = export["quant"]["name"]
    labels = export["labels"]
    scale = float(values["OUTPUT_SCALE"])
    output = (f"int8 logits `[1, {len(labels)}]`; logit = (value - {values['OUTPUT_ZERO_POINT']}) * {scale!r}"
              if scale else f"float32 logits `[1, {len(labels)}]`")
    if kernels.get("quantized_kernels"):
        kernel_line = ("the quantized kernels (`quantized_decomposed::` ops below, e.g. `embedding_byte` for the "
                       "int8 embedding rows; CMake target `quantized_ops_lib`, linked whole-archive).")
    else:
        kernel_line = "no quantized kernels (this program has no `quantized_decomposed::` op)."
    steps = INTEGRATION[fmt].format(
        executorch=runtime.get("executorch", "the version in the manifest"), litert=runtime.get("ai-edge-litert", "?"),
        artifact=export["artifact"], stem=values["MODEL_STEM"], output_name=values["OUTPUT_NAME"],
        deployment=export["params"].get("options", {}).get("deployment_target", "iOS17"), kernel_line=kernel_line,
        arena=delegation.get("arena", {}).get("size", "?"), model_bytes=export.get("size_bytes", "?"),
        table_bytes_kb=f"{tables['table_bytes'] / 1024:.0f} KB", op_count=len(delegation.get("resolver", [])),
        workspace=11 * 100)
    dynamic = ""
    if export.get("dynamic_length"):
        dynamic = (f"\n- Dynamic length: the `.pte` also takes `[1, n]` for any n from 1 to {values['MAX_LENGTH']}; the "
                   f"calling code passes only the text's own n tokens (the count `ekd_tokenize` returns), which is "
                   f"faster than padding. Padded inputs give the same labels.")
    operators = ""
    if kernels.get("operators"):
        operators = ("\nOperators the runtime must provide (read from the `.pte`): "
                     + ", ".join(f"`{o}`" for o in kernels["operators"]) + ".\n")
    return f"""# {export['artifact']}: bundle for {platform} ({fmt})

Made by `edgekd bundle` from an export directory. Everything an app needs to classify text on the device:
the model, the tokenizer as portable C generated for this model's vocabulary, the calling code, the labels.
`manifest.json` lists the sha256 of every file; `edgekd bundle --verify <this folder or its .zip>` re-checks
them and runs the app's steps on a development machine (see "What was verified").

## Files

| path | what |
|---|---|
| `model/` | `{export['artifact']}` ({quant}){', `model_data.h/.cc` (the model as a C array, arena size, op resolver)' if fmt == 'embedded/tflm' else ''}{', `selected_operators.txt`' if fmt == 'embedded/executorch-portable' else ''} |
| `tokenizer/c/` | `edgekd_tokenizer.h/.c` (C99, libc only) and the generated `edgekd_tokenizer_config.h`, `edgekd_tokenizer_tables.h` |
| `tokenizer/` | `vocab.txt` ({tables['vocab_size']} tokens, id = line number from 0) and the Hugging Face tokenizer files |
| `{platform}/` | {', '.join(f'`{c.split("/", 1)[1]}`' for c in code)} |
| `labels.json` | the {len(labels)} labels in logit order: {', '.join(labels)} |
| `verify/expected.json` | the test split: texts, the Hugging Face token ids, the PyTorch student's labels |

## Add it to your project

{steps}

## Model

- Inputs, in this order: `input_ids` int32 `[1, {values['MAX_LENGTH']}]` and `attention_mask` int32
  `[1, {values['MAX_LENGTH']}]` (1 = token, 0 = padding). Output: {output}.{dynamic}
- Quantization: {quant}. Runtime versions it was exported and checked with: {', '.join(f'{k} {v}' for k, v in runtime.items()) or 'see manifest.json'}.
{operators}
## Pre-processing: the C tokenizer

`int ekd_tokenize(ekd_workspace *ws, const char *utf8, size_t len, int32_t *input_ids, int32_t *attention_mask, size_t max_length)`
writes `[CLS]`, the WordPiece ids (truncated to `max_length - 2`), `[SEP]`, then padding with mask 0, and returns
the number of real tokens. Pass `max_length` = `EKD_MAX_LENGTH` ({values['MAX_LENGTH']}). It never allocates and keeps
no state between calls: the caller owns the `ekd_workspace` (about 1.1 KB for words of up to 100 characters;
on the stack, or `static` on a microcontroller). It does what the model's Hugging Face fast tokenizer does:
special tokens written in the text are matched first; then BertNormalizer ({_normalizer(tables)}), canonical ordering of
combining marks, splitting on whitespace and punctuation, greedy longest-match WordPiece (`##` continuations; a
word over 100 characters, or with a character no token covers, is `[UNK]`). The Unicode tables were generated
from this tokenizer's own normalizer: {tables['map_ranges']} normalization ranges, {tables['class_ranges']}
whitespace/punctuation ranges, {tables['combining_classes']} combining classes. Invalid UTF-8 is read as
Python's `bytes.decode("utf-8", "replace")` reads it: each bad sequence becomes U+FFFD, which the text cleaning
drops. Give it UTF-8 bytes: from Kotlin `String.toByteArray(UTF_8)` (JNI's modified UTF-8 differs for NUL
and emoji), from Swift `Array(text.utf8)`.

## Post-processing

Softmax over the {len(labels)} logits, then the label of the largest (`labels.json` order).
{'The int8 logits are dequantized first, as above.' if scale else ''}

## What was verified

- On the machine that made the bundle (`edgekd bundle --verify`): every file's sha256; the C tokenizer, compiled
  with the system C compiler, gives exactly the Hugging Face ids and masks for every text of
  `verify/expected.json`; the model, run in its host runtime on those C-tokenized inputs, with softmax and argmax
  as the calling code does them, gives the PyTorch student's labels (a quantized model: the artifact's own labels;
  its agreement with PyTorch is reported). Core ML runs only on Apple hardware: for an
  iOS bundle the model step is skipped on other machines and says so.
- Not verified by edgekd: the Kotlin, Swift and C++ calling code and the JNI glue were not compiled against the
  ExecuTorch, LiteRT, Core ML or TFLite Micro SDKs, nor run on a device. They are short and mirror the steps
  above; build them in your project and compare a few labels with `verify/expected.json`.
"""


def _normalizer(tables: dict) -> str:
    n = tables.get("normalizer", {})
    return ", ".join(f"{k} {str(v).lower()}" for k, v in n.items() if k != "type")
