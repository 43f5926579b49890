"""The distill command runs unchanged under `torchrun` on two CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from edgekd.manifest import verify_stage


def test_distill_under_torchrun_two_processes(tmp_path, tiny_recipe_dict):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=600)
    done = run("-m", "edgekd", "finetune", "--recipe", str(recipe), "--out", str(tmp_path / "teacher"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "edgekd", "distill", "--recipe", str(recipe), "--teacher", str(tmp_path / "teacher"),
               "--out", str(tmp_path / "student"))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = verify_stage(tmp_path / "student", "distill")
    assert manifest["metrics"]["test"]["n"] == 30
    # Rank 0 alone published the stage: no temporary siblings or checkpoints are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "recipe.yaml", "student", "teacher"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["test"]["n"] == 30
