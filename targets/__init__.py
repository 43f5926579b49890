"""Export targets. A target module registers its formats in FORMATS; adding one is adding a module."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from edgekd.errors import EdgeKDError, RecipeError, install_command
from edgekd.registry import Registry, did_you_mean


@dataclass(frozen=True)
class Format:
    """One artifact format of a target: which QuantSpecs it realizes and how."""
    target: str
    name: str
    backend: str                   # file naming: <model>_<backend>_<quant>.<suffix>
    suffix: str
    specs: tuple[str, ...]
    export: Callable               # (model, spec, max_length, calibration, out_file, **options) -> details dict
    runner: Callable               # (file, threads) -> callable(ids, mask) -> logits
    requires: tuple[str, ...] = () # importable modules it needs
    extra: str = ""                # the pip extra that installs them
    options: dict = field(default_factory=dict)  # option name -> default, given in the recipe's target entry
    # A spec this format has no exact realization of -> its nearest one (ios/coreml: int8 -> int8-weights),
    # so `compress.quant: [int8]` means each target's int8.
    nearest: dict = field(default_factory=dict)
    option_checks: dict = field(default_factory=dict)  # option name -> callable(value): a problem line or None
    evaluate: Callable | None = None  # (model, spec, max_length, calibration) -> (callable(ids, mask) -> logits, how)
    model_check: Callable | None = None  # (spec, model config) -> why this model cannot have spec, or None

    def realize(self, name: str) -> str:
        """The spec this format exports for the asked spec `name`: itself, or its nearest realization."""
        if name in self.specs:
            return name
        if name in self.nearest:
            return self.nearest[name]
        known = ", ".join(self.specs + tuple(self.nearest))
        raise RecipeError(f"{self.target}/{self.name} cannot realize quantization '{name}'; it realizes {known}: "
                          f"list one in this target's own specs, e.g. `{{target: {self.target}, format: {self.name}, "
                          f"quant: [{self.specs[-1]}]}}`")

    def resolve_options(self, given: dict | None) -> dict:
        """The export options: the defaults updated by `given`; an unknown name is an error."""
        given = dict(given or {})
        for name in given:
            if name not in self.options:
                known = ", ".join(self.options) or "none"
                raise RecipeError(f"{self.target}/{self.name} has no option '{name}'"
                                  f"{did_you_mean(name, list(self.options))}; its options: {known}")
            if isinstance(self.options[name], bool) and not isinstance(given[name], bool):
                raise RecipeError(f"{self.target}/{self.name} option '{name}' takes true or false, "
                                  f"not {given[name]!r}")
            problem = self.option_checks[name](given[name]) if name in self.option_checks else None
            if problem:
                raise RecipeError(f"{self.target}/{self.name} option {problem}")
        return {**self.options, **given}

    def spec_problem(self, spec, options: dict) -> str | None:
        """What keeps this format from exporting QuantSpec `spec` with `options`, or None (a subclass checks more)."""
        return None

    def check_installed(self) -> None:
        """Fail before any work when the converter or runtime of this format is missing."""
        missing = [m for m in self.requires if not _importable(m)]
        if missing:
            raise EdgeKDError(f"{self.target}/{self.name} needs {', '.join(missing)}, which is not installed; "
                              f"run `{install_command(self.extra)}`")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install: as good as absent
        return False


FORMATS: Registry[Format] = Registry("target format")


@dataclass(frozen=True)
class Reference:
    """What a quantized artifact is proven against: its own quantized graph, run somewhere trusted.

    A format's exporter returns one as details["reference"] (the graph it built, same calibration);
    export.py runs it and the artifact on the same texts and refuses the artifact when a logit differs
    by more than `tolerance` x (1 + the reference's largest |logit| on that text). A format that returns
    none for a quantized spec is proven structurally only, and judged by the accuracy budget."""
    name: str                      # recorded in the manifest, e.g. "the PT2E program in PyTorch"
    run: Callable                  # (ids, mask) -> logits [1, C]
    tolerance: float               # relative to the text's logit scale (see above)
    why: str = ""                  # where the tolerance comes from


class RuntimeUnavailable(EdgeKDError):
    """Raised by a runner whose runtime cannot run on this machine (Core ML off Apple hardware).

    Export then keeps the format's structural check as parity and claims no runtime metrics;
    a benchmark stops with this one line.
    """


def get_format(target: str, fmt: str | None = None) -> Format:
    """Look up `target` (android, ios, embedded) and one of its formats (its first when None)."""
    names = [n for n in FORMATS.in_order() if n.startswith(f"{target}/")]  # a target's main format first
    if not names:
        targets = sorted({n.split("/")[0] for n in FORMATS.names()})
        raise RecipeError(f"unknown target '{target}'{did_you_mean(target, targets)}; known: {', '.join(targets)}")
    found = FORMATS.get(f"{target}/{fmt}" if fmt else names[0])
    found.check_installed()
    return found


def _register_builtin_targets():
    from edgekd.targets import android, embedded, ios  # noqa: F401


_register_builtin_targets()
