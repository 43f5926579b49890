"""The `edgekd` command. User errors print one line and exit 1; usage errors exit 2; an internal error
(a bug) prints one line naming it and exits 3 (`--debug` or EDGEKD_DEBUG=1 shows its traceback)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.tasks import DEFAULT_TASK, TASKS

EXAMPLES = {
    "demo": "edgekd demo --out runs/demo\n  edgekd demo --print-recipe > my-recipe.yaml\n"
            "  edgekd demo --task text-generation --print-recipe > my-lm.yaml",
    "run": "edgekd run my-recipe.yaml --out runs/mine",
    "finetune": "edgekd finetune --recipe my-recipe.yaml --out runs/mine/finetune",
    "distill": "edgekd distill --recipe my-recipe.yaml --teacher runs/mine/finetune --out runs/mine/distill",
    "compress": "edgekd compress --recipe my-recipe.yaml --student runs/mine/distill --quant int8 "
                "--out runs/mine/compress\n  edgekd compress --recipe my-recipe.yaml --student runs/mine/distill "
                "--teacher runs/mine/finetune --budget 1.0 --objective latency --out runs/mine/compress",
    "export": "edgekd export --recipe my-recipe.yaml --model runs/mine/compress --target android --quant int8 "
              "--out runs/mine/export/student-int8",
    "bench": "edgekd bench runs/mine/export/* --out runs/mine/bench --iterations 200 --baselines torch,onnxruntime"
             "\n  edgekd bench runs/mine/export/*executorch* --device android --executor-runner "
             "cmake-out-android/executor_runner --out runs/mine/bench-android",
    "report": "edgekd report runs/mine\n  edgekd report runs/mine --json --price-per-core-hour 0.05",
    "verify": "edgekd verify runs/mine/export/student-int8-android-executorch",
    "bundle": "edgekd bundle runs/mine/export/student-int8-android-executorch --platform android "
              "--recipe my-recipe.yaml --out runs/mine/bundle/android\n"
              "  edgekd bundle --verify runs/mine/bundle/android.zip",
}


def _recipe(path: str | None, args=None):
    from edgekd.recipe import builtin_recipe, load_recipe

    recipe = load_recipe(path) if path else builtin_recipe(getattr(args, "task", None))
    if getattr(args, "allow_pickle", False):  # --allow-pickle: as if the recipe set both fields
        recipe.teacher.allow_pickle = recipe.student.allow_pickle = True
    return recipe


def cmd_demo(args) -> str:
    from edgekd.recipe import builtin_recipe_text

    if args.print_recipe:
        return builtin_recipe_text(args.task)
    return _run_and_print(_recipe(None, args), args)


def cmd_run(args) -> str:
    return _run_and_print(_recipe(args.recipe, args), args)


def _run_and_print(recipe, args) -> str:
    from edgekd.pipeline import run
    from edgekd.report import machine_summary

    summary = run(recipe, Path(args.out))
    if args.json:
        return json.dumps(machine_summary(summary) if recipe.task == DEFAULT_TASK else summary, indent=2)
    return (Path(args.out) / "report.md").read_text(encoding="utf-8") + f"\nreport: {Path(args.out) / 'report.html'}"


def cmd_finetune(args) -> str:
    from edgekd.data import load_dataset
    from edgekd.distill.finetune import finetune
    from edgekd.preflight import preflight

    _check_out(args, "finetune")
    recipe = _recipe(args.recipe, args)
    preflight(recipe)
    return _print_metrics(finetune(recipe, load_dataset(recipe), Path(args.out)), args)


def cmd_distill(args) -> str:
    from edgekd.data import load_dataset
    from edgekd.distill.distill import distill
    from edgekd.preflight import preflight

    _check_out(args, "distill")
    recipe = _recipe(args.recipe, args)
    preflight(recipe, teacher=args.teacher)
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out.parent / ".cache"
    return _print_metrics(distill(recipe, load_dataset(recipe), Path(args.teacher), out, cache), args)


def cmd_compress(args) -> str:
    from edgekd.compress.compress import compress
    from edgekd.data import load_dataset
    from edgekd.preflight import preflight
    from edgekd.targets import get_format

    _check_out(args, "compress")
    recipe = _recipe(args.recipe)
    cfg = recipe.compress
    if args.quant:
        cfg.quant = args.quant
    if args.budget is not None:
        cfg.budget = args.budget
    if args.objective:
        cfg.objective = args.objective
    if args.budget_from:
        cfg.budget_from = args.budget_from
    cfg.__post_init__()  # the flags obey the recipe's rules
    preflight(recipe, teacher=args.teacher, student=args.student)
    target = recipe.targets[0]
    fmt = get_format(args.target or target.target, args.format or (None if args.target else target.format))
    # the recipe's options for that target (its deployment target, dynamic_length): the search exports with them
    given = next((t.options for t in recipe.targets if (t.target, t.format) == (fmt.target, fmt.name)), None)
    teacher = Path(args.teacher) if args.teacher else None
    return _print_metrics(compress(recipe, load_dataset(recipe), Path(args.student), Path(args.out), teacher, fmt,
                                   fmt.resolve_options(given)), args)


def cmd_export(args) -> str:
    from edgekd.compress.quant import get_spec
    from edgekd.data import load_dataset
    from edgekd.manifest import read_manifest
    from edgekd.targets import get_format
    from edgekd.targets.export import export_artifact

    _check_out(args, "export")
    recipe = _recipe(args.recipe)
    fmt = get_format(args.target, args.format)
    spec = get_spec(args.quant)
    stage = read_manifest(Path(args.model))["stage"]
    role = "teacher" if stage == "finetune" else ("student" if spec.is_float else "compressed")
    name = args.name or f"{recipe.name}-{'teacher' if role == 'teacher' else 'student'}"
    # The options of the recipe's entry for this target format (e.g. ios deployment_target), if it has one.
    options = next((t.options for t in recipe.targets
                    if t.target == fmt.target and (t.format or get_format(t.target).name) == fmt.name), {})
    metrics = export_artifact(Path(args.model), stage, fmt, spec, load_dataset(recipe), Path(args.out), role,
                              name, recipe.bench.threads, options, recipe.compress.budget)
    return _print_metrics(metrics, args)


def cmd_bench(args) -> str:
    from edgekd.benchmarks.devices import Settings
    from edgekd.benchmarks.runtimes import parse_baselines
    from edgekd.benchmarks.stage import bench
    from edgekd.errors import BenchError

    _check_out(args, "bench")
    baselines = tuple(b.name for b in parse_baselines(args.baselines))
    options = {"executor_runner": args.executor_runner, "benchmark_model": args.benchmark_model,
               "android_runner": args.android_runner, "xctestrun": args.xctestrun, "llama_main": args.llama_main,
               "litert_lm_main": args.litert_lm_main}
    settings = Settings(iterations=args.iterations, warmup=args.warmup, threads=args.threads, seconds=args.seconds,
                        baselines=baselines, cooldown=args.cooldown, timeout=args.timeout, rounds=args.rounds,
                        options={k: v for k, v in options.items() if v is not None})
    try:
        lengths = tuple(int(n) for n in args.prompt_tokens.split(","))
    except ValueError:
        raise BenchError(f"--prompt-tokens takes lengths in tokens, comma-separated (e.g. 64,128), "
                          f"not {args.prompt_tokens!r}") from None
    decoder = {"prompt_lengths": lengths, "new_tokens": args.new_tokens}
    metrics = bench([Path(p) for p in args.artifacts], Path(args.out), device=args.device, settings=settings,
                    decoder=decoder)
    if args.json:
        return json.dumps(metrics, indent=2)
    if metrics.get("schema", "").startswith("edgekd.bench-llm"):
        return "\n".join(_decoder_line(row) for row in metrics["results"])
    return "\n".join(_bench_line(row) for row in metrics["results"])


def _decoder_line(row: dict) -> str:
    parts = [f"{row['name']:<48}"]
    for key, label in (("decode_tokens_per_s", "decode {:7.1f} tokens/s"), ("prefill_tokens_per_s",
                       "prefill {:8.1f} tokens/s"), ("ttft_ms", "first token {:7.1f} ms")):
        if row.get(key) is not None:
            parts.append(label.format(row[key]))
    return "  ".join(parts)


def _bench_line(row: dict) -> str:
    lat = row["latency_ms"]
    p50 = f"p50 {lat['p50']:8.3f} ms  p90 {lat['p90']:8.3f} ms" if lat.get("p50") is not None else \
        f"mean {lat['mean']:7.3f} ms (the tool keeps no per-run times)"
    load = f"  load {row['load_ms']:7.1f} ms" if row.get("load_ms") is not None else ""
    cpu = f"  cpu {row['cpu_ms_per_inference']:7.3f} ms/inference" if row.get("cpu_ms_per_inference") else ""
    return f"{row['name']:<48} {p50}{load}{cpu}"


def cmd_report(args) -> str:
    from edgekd.report import machine_summary, report_dir, write_report

    out = report_dir(Path(args.run_dir), Path(args.out) if args.out else None)
    summary = write_report(Path(args.run_dir), price_per_core_hour=args.price_per_core_hour, out=out)
    if args.json:  # a generation run's summary is already the machine view (no latency samples in it)
        return json.dumps(machine_summary(summary) if summary["schema"].startswith("edgekd.report/") else summary,
                          indent=2)
    return (out / "report.md").read_text(encoding="utf-8")


def cmd_verify(args) -> str:
    from edgekd.manifest import verify_stage

    manifest = verify_stage(Path(args.dir))
    return f"ok: {args.dir} ({manifest['stage']}, {len(manifest['files'])} files, checksums match)"


def cmd_bundle(args) -> str:
    from edgekd.bundle import make_bundle, verify_bundle

    if args.verify:
        if args.artifact_dir or args.out or args.platform:
            raise EdgeKDError("--verify takes only the bundle folder or zip; drop ARTIFACT_DIR, --platform and --out")
        result = verify_bundle(Path(args.verify))
        if args.json:
            return json.dumps(result, indent=2)
        model = result.get("model") or (f"model labels agree with PyTorch on "
                                        f"{result['pytorch_agreement']:.1%} of the texts")
        return (f"ok: {args.verify} ({result['files']} files, checksums match; "
                f"{result.get('tokenizer_library', 'C tokenizer')} exact on {result['texts']} "
                f"{result.get('texts_are', 'test texts')}; {model})")
    if not (args.artifact_dir and args.platform and args.out):
        raise EdgeKDError("edgekd bundle needs ARTIFACT_DIR, --platform and --out (or --verify BUNDLE)")
    # No --recipe: the built-in recipe of the export's task (make_bundle reads which).
    bundle = make_bundle(Path(args.artifact_dir), args.platform, Path(args.out),
                         _recipe(args.recipe) if args.recipe else None)
    return _print_metrics(bundle, args)


def _check_out(args, stage: str) -> None:
    """A user's folder or file at --out is refused before the recipe, the data or a model is read."""
    from edgekd.manifest import check_out

    check_out(Path(args.out), stage)


def _print_metrics(metrics: dict, args) -> str:
    return json.dumps(metrics, indent=2 if args.json else None, default=str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgekd", description="Distill, compress, export and benchmark text classifiers for phones and "
        "embedded boards.", epilog=f"example:\n  {EXAMPLES['demo']}\n  {EXAMPLES['run']}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an internal error (also: EDGEKD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an internal error (also: EDGEKD_DEBUG=1)")
        return p

    def recipe_opt(p):
        p.add_argument("--recipe", help="recipe YAML (default: the built-in demo recipe)")

    def pickle_opt(p):
        p.add_argument("--allow-pickle", action="store_true",
                       help="read a teacher or student.model that has only .bin/.pt weights, with "
                            "torch.load(weights_only=True) (default: safetensors only)")

    p = add("demo", cmd_demo, "run the whole pipeline on the built-in model and data")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--print-recipe", action="store_true", help="print the built-in recipe and exit")
    p.add_argument("--task", choices=tuple(TASKS), default=DEFAULT_TASK,
                   help="which built-in demo: a classifier (default) or a decoder LM")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = add("run", cmd_run, "run every stage of a recipe")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--out", required=True, help="run directory")
    pickle_opt(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = add("finetune", cmd_finetune, "fine-tune the teacher")
    recipe_opt(p)
    pickle_opt(p)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")

    p = add("distill", cmd_distill, "distill the teacher into a student")
    recipe_opt(p)
    pickle_opt(p)
    p.add_argument("--teacher", required=True, help="a finetune stage directory")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", help="teacher logit cache (default: OUT/../.cache)")
    p.add_argument("--json", action="store_true")

    p = add("compress", cmd_compress, "prune and quantize the student, or search within an accuracy budget")
    recipe_opt(p)
    p.add_argument("--student", required=True, help="a distill stage directory")
    p.add_argument("--teacher", help="the finetune stage directory (pruning recovers by distilling from it)")
    p.add_argument("--quant", action="append", help="QuantSpec name, repeatable (default: the recipe's)")
    p.add_argument("--budget", type=float, help="search: validation accuracy points the student may lose")
    p.add_argument("--objective", choices=("latency", "size"), help="search: what to minimize (default: latency)")
    p.add_argument("--budget-from", choices=("teacher", "student"),
                   help="search: count the budget from the teacher's accuracy (default) or the student's")
    p.add_argument("--target", help="target whose runtime the search measures (default: the recipe's first)")
    p.add_argument("--format", help="format of that target (default: its first)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "export a model for a target and check it against PyTorch")
    recipe_opt(p)
    p.add_argument("--model", required=True, help="a finetune, distill or compress stage directory")
    p.add_argument("--target", required=True, help="android (ios and embedded: see the README)")
    p.add_argument("--format", help="artifact format of the target (default: its first)")
    p.add_argument("--quant", default="fp32", help="QuantSpec name (default: fp32)")
    p.add_argument("--name", help="model name in the file name (default: <recipe name>-<role>)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")

    p = add("bench", cmd_bench, "measure latency of exported artifacts on this machine or a device, interleaved")
    p.add_argument("artifacts", nargs="+", help="export stage directories")
    p.add_argument("--out", required=True, help="bench stage directory to write (edgekd.bench/2 result)")
    p.add_argument("--device", default="host",
                   help="host (default), android[:SERIAL] (adb), ios[:UDID] (macOS with Xcode)")
    p.add_argument("--iterations", type=int, default=100, help="timed runs per variant (default: 100)")
    p.add_argument("--seconds", type=float, help="host: a time budget for the timed loop instead of --iterations")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per variant first (default: 10)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0: the runtime's default")
    p.add_argument("--baselines", help="host: also measure the artifacts' source model in these runtimes, "
                                       "comma-separated: torch, onnxruntime")
    p.add_argument("--rounds", type=int, default=1,
                   help="devices: runs per artifact, interleaved A B A B, iterations split between them")
    p.add_argument("--cooldown", type=float, default=0.0, help="devices: idle seconds before each run (default: 0)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="devices: seconds any one device command may take (default: 600)")
    p.add_argument("--executor-runner", help="android: ExecuTorch executor_runner built for Android (see README)")
    p.add_argument("--benchmark-model", help="android: LiteRT benchmark_model built for Android (see README)")
    p.add_argument("--android-runner", choices=("executor_runner", "minibench"),
                   help="android: what runs .pte files (default: executor_runner)")
    p.add_argument("--xctestrun", help="ios: the .xctestrun of ExecuTorch's Benchmark app (build-for-testing)")
    p.add_argument("--llama-main", help="android, .pte decoder LM exports: ExecuTorch's llama_main built for Android")
    p.add_argument("--litert-lm-main", help="android, .litertlm exports: LiteRT-LM's benchmark binary for Android "
                                            "(litert_lm_advanced_main, or litert_lm_main up to v0.7.0)")
    p.add_argument("--prompt-tokens", default="64,128,512",
                   help="decoder LM exports: prompt lengths in tokens, comma-separated (default: 64,128,512)")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="decoder LM exports: tokens generated per run, eos ignored (default: 32)")
    p.add_argument("--json", action="store_true")

    p = add("report", cmd_report, "write report.md/.html/.json and plots for a run or bench directory")
    p.add_argument("run_dir", help="a run directory (export/ and bench/), or a bench stage directory")
    p.add_argument("--out", help="where to write the report (default: the run directory; for a bench "
                                 "directory, its parent)")
    p.add_argument("--price-per-core-hour", type=float, default=None,
                   help="USD per CPU core-hour for the inference-cost row (default: 0.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a `variants` list")

    p = add("verify", cmd_verify, "re-check the checksums of a stage directory")
    p.add_argument("dir")

    p = add("bundle", cmd_bundle, "bundle an exported model for an app (model, C tokenizer, calling code), "
                                  "or --verify a bundle by simulating the app here")
    p.add_argument("artifact_dir", nargs="?", help="an export stage directory")
    p.add_argument("--platform", choices=("android", "ios", "embedded"), help="the app's platform")
    recipe_opt(p)
    p.add_argument("--out", help="bundle folder; a zip of it is written beside it (OUT.zip)")
    p.add_argument("--verify", metavar="BUNDLE", help="check a bundle folder or zip instead of making one")
    p.add_argument("--json", action="store_true")
    return parser


def _quiet_libraries() -> None:
    """Library chatter buries the one line that matters; keep warnings for --verbose runs."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    # torchao logs missing optional CUDA kernels; torch's pytree logs deprecations, at import time.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _printable(message: str) -> str:
    """One visible line, always: user input quoted in a message (a path, a column name) may hold line
    breaks, control characters or an invisible byte-order mark; they are shown escaped (\\n, \\ufeff)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


INTERNAL_ERROR = 3  # a bug in edgekd (or a library), not in the user's input: exit 1 is for user errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    debug = args.debug or os.environ.get("EDGEKD_DEBUG", "") not in ("", "0")
    try:
        # Progress and library chatter go to stderr; stdout carries only the result (e.g. --json).
        with contextlib.redirect_stdout(sys.stderr):
            text = args.func(args)
    except EdgeKDError as exc:
        for line in getattr(exc, "problems", None) or [str(exc)]:  # the pre-flight: one line per problem
            print(f"error: {_printable(line)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, and the way to the traceback
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if debug else "; rerun with --debug (or EDGEKD_DEBUG=1) for the traceback, and report it"
        print(f"error: internal error: {type(exc).__name__}: {_printable(message[:300])}{hint}", file=sys.stderr)
        return INTERNAL_ERROR
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
