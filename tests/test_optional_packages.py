"""Every package the `all` extra promises imports; under CI (EDGEKD_REQUIRE_OPTIONAL=1) a missing one fails the run."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# tomllib is Python 3.11+; pytest itself depends on tomli before that
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parent.parent
# distribution name in pyproject.toml -> the module the code imports
MODULES = {"executorch": "executorch", "ai-edge-litert": "ai_edge_litert", "litert-torch": "litert_torch",
           "ai-edge-quantizer": "ai_edge_quantizer", "tflite-micro": "tflite_micro", "coremltools": "coremltools",
           "onnxruntime": "onnxruntime", "onnx": "onnx", "gguf": "gguf", "peft": "peft",
           "typing-extensions": "typing_extensions", "tensorflow-cpu": "tensorflow", "litert-lm-api": "litert_lm"}


def _all_extra() -> set[str]:
    """The distributions of the `all` extra, its self-references (edgekd[android,...]) expanded."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        found = set()
        for requirement in extras[name]:
            inner = re.fullmatch(r"edgekd\[(.+)\]", requirement)
            found |= set().union(*(expand(n.strip()) for n in inner[1].split(","))) if inner else \
                {re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower()}
        return found

    return expand("all")


def test_every_package_of_the_all_extra_imports():
    promised = _all_extra()
    assert promised == set(MODULES), f"map the new packages of the `all` extra to modules: {promised ^ set(MODULES)}"
    missing = []
    for dist in sorted(promised):
        try:
            importlib.import_module(MODULES[dist])
        except ImportError as exc:
            missing.append(f"{dist} ({exc})")
    if missing and os.environ.get("EDGEKD_REQUIRE_OPTIONAL") != "1":
        pytest.skip(f"optional packages not installed: {', '.join(missing)}")
    assert not missing, f"the `all` extra is installed, yet these do not import: {', '.join(missing)}"


@pytest.mark.parametrize("required", [True, False])
def test_a_missing_optional_package_fails_only_under_ci(tmp_path, required):
    shutil.copyfile(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text('import pytest\n\npytest.importorskip("edgekd_no_such_module")\n\n\n'
                                            'def test_probe():\n    pass\n')
    env = {**os.environ, "EDGEKD_REQUIRE_OPTIONAL": "1" if required else "0"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if required:
        assert result.returncode not in (0, 5) and "edgekd_no_such_module is missing" in result.stdout, result.stdout
    else:
        assert result.returncode == 5 and "skipped" in result.stdout, result.stdout
