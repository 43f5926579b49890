"""Tasks: one module per task owns what differs between model families (DESIGN.md, "Tasks").

A recipe names its `task`; `get_task(name)` gives the module, which provides
    RECIPE        the recipe dataclass of that task (its sections and their checks)
    DEMO_RECIPE   the file name of its built-in demo recipe in edgekd/resources/recipes
    run(recipe, out) -> dict   the chain of stages into the run folder `out`, returning the report summary
Adding a task is adding one module here and one line to TASKS.
"""
from __future__ import annotations

import importlib

from edgekd.errors import RecipeError
from edgekd.registry import did_you_mean

DEFAULT_TASK = "text-classification"
TASKS = {
    "text-classification": "edgekd.tasks.classification",
    "text-generation": "edgekd.tasks.generation",
}


def get_task(name):
    """The module of task `name`; an unknown one is one line naming the known tasks."""
    if not isinstance(name, str) or name not in TASKS:
        raise RecipeError(f"task {name!r} is not one edgekd knows{did_you_mean(str(name), TASKS)}; "
                          f"known: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
