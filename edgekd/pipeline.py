"""The pipeline: the recipe's task runs its chain of stages over one run directory.

    RUN/finetune -> RUN/distill -> ... -> RUN/export/<variant> -> RUN/bench -> RUN/report.*

Which stages, and what flows between them, is the task's (edgekd/tasks/); what every chain shares is here.
"""
from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from edgekd.errors import ExportError, GateError


def log(message: str) -> None:
    print(f"[edgekd] {message}", file=sys.stderr, flush=True)


def timed(label: str, func: Callable, *args):
    """func(*args), with one line when it starts and one with its seconds when it ends."""
    started = time.time()
    log(f"{label} ...")
    result = func(*args)
    log(f"{label}: {time.time() - started:.0f} s")
    return result


def export_variants(out: Path, exports: dict[str, Callable[[], object]], workers: int = 1) -> dict[str, dict]:
    """Run each variant's export, RUN/plan.json rewritten after each; a variant that fails its gate is recorded
    with its reason and does not throw the others away. Returns the outcomes by variant name.

    With `workers` > 1, that many exports run at once, each in a spawned process of its own with the cores shared
    out (the exports must be picklable: a module-level function and its arguments). Meant for exports whose time
    is mostly single-threaded Python, as ExecuTorch's lowering of a decoder is, which leaves the other cores
    idle (the generation demo's two exports: 392 s side by side, 739 s one after the other).
    EDGEKD_EXPORT_WORKERS=1 runs them one after the other."""
    from edgekd.report import write_plan

    workers = min(workers, len(exports), _workers_setting(workers))
    outcomes = {name: {"status": "pending"} for name in exports}
    write_plan(out, outcomes)
    if workers <= 1:
        for name, export in exports.items():
            _settle(out, outcomes, name, partial(timed, f"export {name}", export))
        return outcomes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_share_cores, initargs=(threads,)) as pool:
        futures = {name: pool.submit(timed, f"export {name}", export) for name, export in exports.items()}
        for name, future in futures.items():
            try:
                _settle(out, outcomes, name, future.result)
            except BrokenProcessPool:
                pool.shutdown(cancel_futures=True)
                raise ExportError(f"the process exporting {name} died (out of memory?); nothing of it was written: "
                                  f"rerun with EDGEKD_EXPORT_WORKERS=1 to export one variant at a time") from None
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    return outcomes


def _workers_setting(default: int) -> int:
    value = os.environ.get("EDGEKD_EXPORT_WORKERS", str(default))
    if not value.isdigit() or int(value) < 1:
        raise ExportError(f"EDGEKD_EXPORT_WORKERS={value!r} must be a whole number of at least 1 (1: one export "
                          f"at a time)")
    return int(value)


def _settle(out: Path, outcomes: dict[str, dict], name: str, export: Callable[[], object]) -> None:
    from edgekd.report import write_plan

    try:
        export()
        outcomes[name] = {"status": "exported"}
    except GateError as exc:
        log(f"export {name}: failed: {exc}")
        outcomes[name] = {"status": "failed", "reason": str(exc)}
    write_plan(out, outcomes)


def _share_cores(threads: int) -> None:
    """In a spawned export process: its share of the cores for torch's intra-op threads."""
    import torch

    torch.set_num_threads(threads)


def exported(out: Path, outcomes: dict[str, dict]) -> list[Path]:
    return [Path(out) / "export" / name for name, outcome in outcomes.items() if outcome["status"] == "exported"]


def raise_if_failed(outcomes: dict[str, dict], report: Path) -> None:
    """One line naming the variants that failed their gate, after the report of the others is written."""
    failed = [name for name, outcome in outcomes.items() if outcome["status"] == "failed"]
    if failed:
        raise GateError(f"{len(failed)} of {len(outcomes)} variants failed their gate ({', '.join(failed)}); the "
                        f"report of the others, with the reasons, is in {report}")


def run(recipe, out: Path) -> dict:
    """Run every stage of `recipe` into `out`; return the report summary."""
    from edgekd.manifest import check_run_dir
    from edgekd.tasks import get_task

    check_run_dir(out)  # a user's folder is refused before anything is read or trained
    return get_task(recipe.task).run(recipe, Path(out))
