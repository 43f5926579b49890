"""The pipeline: the recipe's task runs its chain of stages over one run directory.

    RUN/finetune -> RUN/distill -> ... -> RUN/export/<variant> -> RUN/bench -> RUN/report.*

Which stages, and what flows between them, is the task's (edgekd/tasks/); what every chain shares is here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from edgekd.errors import GateError


def log(message: str) -> None:
    print(f"[edgekd] {message}", file=sys.stderr, flush=True)


def timed(label: str, func: Callable, *args):
    """func(*args), with one line when it starts and one with its seconds when it ends."""
    started = time.time()
    log(f"{label} ...")
    result = func(*args)
    log(f"{label}: {time.time() - started:.0f} s")
    return result


def export_variants(out: Path, exports: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """Run each variant's export in order, RUN/plan.json rewritten after each; a variant that fails its gate is
    recorded with its reason and does not throw the others away. Returns the outcomes by variant name."""
    from edgekd.report import write_plan

    outcomes = {name: {"status": "pending"} for name in exports}
    write_plan(out, outcomes)
    for name, export in exports.items():
        try:
            timed(f"export {name}", export)
            outcomes[name] = {"status": "exported"}
        except GateError as exc:
            log(f"export {name}: failed: {exc}")
            outcomes[name] = {"status": "failed", "reason": str(exc)}
        write_plan(out, outcomes)
    return outcomes


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
