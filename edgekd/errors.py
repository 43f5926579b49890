"""One error hierarchy. The CLI prints `error: <message>` and exits 1 for any EdgeKDError."""


class EdgeKDError(Exception):
    """A user-facing failure: the message names the problem and the fix."""


class RecipeError(EdgeKDError):
    """The recipe (YAML or CLI options) is invalid."""


class DataError(EdgeKDError):
    """A data file is missing, unreadable or inconsistent."""


class ModelError(EdgeKDError):
    """A model directory cannot be loaded or does not fit the task."""


class StageError(EdgeKDError):
    """A stage directory is missing, incomplete or fails its checksums."""


class ExportError(EdgeKDError):
    """An artifact could not be produced, or failed its parity check."""


class BenchError(EdgeKDError):
    """A benchmark could not run or finished only partially."""


class RecipeProblems(RecipeError):
    """Every problem the pre-flight found in a recipe, one line each (the CLI prints each as an `error:` line)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class GateError(ExportError):
    """An artifact was produced but failed its gate (parity with its own reference, or the accuracy budget).

    `edgekd run` records the variant as failed and carries on with the others; `edgekd export` stops."""


def install_command(extra: str) -> str:
    """The pip command that adds edgekd's optional `extra` to this installation. From a source folder (the README's
    `pip install -e .`) it names that folder: `pip install 'edgekd[x]'` there would look for edgekd on PyPI."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    # Every edgekd distribution on the path: run from the source folder, its edgekd.egg-info (no install record)
    # is found before the installed one.
    found = (d.read_text("direct_url.json") for d in metadata.distributions(name="edgekd"))
    try:
        direct = json.loads(next((text for text in found if text), "{}"))
    except ValueError:
        direct = {}
    url = urlparse(direct.get("url", ""))
    if url.scheme == "file":
        editable = "-e " if direct.get("dir_info", {}).get("editable") else ""
        return f"pip install {editable}'{unquote(url.path)}[{extra}]'"
    return f"pip install 'edgekd[{extra}]'"
