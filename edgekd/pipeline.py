"""The pipeline: the recipe's task runs its chain of stages over one run directory.

    RUN/finetune -> RUN/distill -> ... -> RUN/export/<variant> -> RUN/bench -> RUN/report.*

Which stages, and what flows between them, is the task's (edgekd/tasks/); what every chain shares is here.
"""
from __future__ import annotations

import sys
from pathlib import Path


def log(message: str) -> None:
    print(f"[edgekd] {message}", file=sys.stderr, flush=True)


def run(recipe, out: Path) -> dict:
    """Run every stage of `recipe` into `out`; return the report summary."""
    from edgekd.manifest import check_run_dir
    from edgekd.tasks import get_task

    check_run_dir(out)  # a user's folder is refused before anything is read or trained
    return get_task(recipe.task).run(recipe, Path(out))
