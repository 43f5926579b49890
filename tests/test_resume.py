"""Kill -9 mid-training, rerun the same command: it resumes from the last checkpoint and ends where an
uninterrupted run with the same seed ends.

Each stage runs three times as a real `edgekd` subprocess: once uninterrupted (the reference), once
killed with SIGKILL as soon as its first checkpoint is complete, and once more with the same command.
Tolerance, found on CPU: none needed. The Trainer restores model, optimizer, scheduler, RNG states and
data order from the checkpoint, so the resumed run's weights are bit-identical to the reference's
(same sha256 in the manifest) and its metrics are equal, not just close.

The budget search (`compress --budget`) keeps each evaluated candidate, each recovered pruning level
and the recovery's Trainer checkpoints; it is killed while recovering its second pruning level. Tolerance:
accuracies, sizes, the front, the choice and the chosen weights are identical (exact, as above);
latency is measured again by the rerun (timing noise), so it is checked to be there, not equal.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import COMPANIES, WORDS, make_rows, write_csv

EDGEKD = Path(sys.executable).with_name("edgekd")
EPOCHS = 4
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _small_tokenizer(folder: Path):
    """A WordPiece tokenizer whose vocabulary is just the test corpus (a 30k vocabulary would dominate
    the tiny model's size and make every training step and checkpoint slow)."""
    from transformers import BertTokenizerFast

    words = {w.lower().strip(".,") for phrases in WORDS.values() for p in phrases for w in p.split()}
    words |= {w.lower() for c in COMPANIES for w in c.split()}
    words |= set("in the first second third fourth quarter analysts said company a filing showed".split())
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *alphabet, *[f"##{c}" for c in alphabet]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
    (folder / "vocab.txt").unlink()
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("resume")
    tokenizer = _small_tokenizer(root / "teacher")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)).save_pretrained(root / "teacher")
    data = {"train": write_csv(root / "train.csv", make_rows(96, 1)),
            "validation": write_csv(root / "validation.csv", make_rows(30, 2)),
            "test": write_csv(root / "test.csv", make_rows(30, 3))}
    # patience above the epoch count: early stopping would make "how far it got" depend on the data.
    recipe = {"version": 1, "name": "resume", "seed": 0,
              "teacher": {"model": str(root / "teacher"), "epochs": EPOCHS, "batch_size": 8, "learning_rate": 1e-3,
                          "patience": EPOCHS + 1},
              "data": {name: str(path) for name, path in data.items()},
              "student": {"layers": [1, 3], "epochs": EPOCHS, "batch_size": 8, "learning_rate": 1e-3, "augment": 1}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "recipe": root / "recipe.yaml"}


def _command(stage: str, recipe: Path, out: Path, teacher: Path | None = None) -> list[str]:
    argv = [str(EDGEKD), stage, "--recipe", str(recipe), "--out", str(out), "--json"]
    if teacher is not None:
        argv += ["--teacher", str(teacher), "--cache-dir", str(out.parent / ".cache")]
    return argv


def _env() -> dict:
    # One thread: the same arithmetic (reduction order) in every run, whatever else the machine does.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def _run(argv: list[str]) -> tuple[dict, str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def _complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (the Trainer's last file) is whole: a kill while it is being written
    leaves one cut short, which edgekd rightly does not resume from (the test used to kill there under load)."""
    return sorted(state for state in out.parent.glob(f".{out.name}.checkpoints-*/checkpoint-*/trainer_state.json")
                  if _parses(state))


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _kill_when(argv: list[str], ready, waiting_for: str) -> None:
    """Start the command and SIGKILL it as soon as `ready()` is true (within 240 s, before it finishes)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"no {waiting_for} within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _kill_after_first_checkpoint(argv: list[str], out: Path) -> int:
    """Start the command, SIGKILL it once a checkpoint is complete; return the checkpoint's step."""
    _kill_when(argv, lambda: _complete_checkpoints(out), "checkpoint")
    return max(int(p.parent.name.split("-")[1]) for p in _complete_checkpoints(out))


def _assert_nothing_looks_complete(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*/manifest.json"))  # not even the temporary stage got that far
    assert _complete_checkpoints(out)                             # but the checkpoint survived


def _trained_epochs(stderr: str) -> list[float]:
    """The epochs a run trained, from edgekd's per-epoch lines ("[edgekd] epoch 2: loss 0.563")."""
    return [float(m) for m in re.findall(r"\[edgekd\] epoch ([0-9.]+): loss ", stderr)]


def _weights_sha(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]


def _check_resumed(reference: tuple[dict, str], resumed: tuple[dict, str], killed_at: int, out: Path, ref: Path,
                   ignore: tuple[str, ...] = ()) -> None:
    (ref_metrics, ref_err), (metrics, err) = reference, resumed
    steps_per_epoch = 96 // 8 if "finetune" in out.name else None
    assert re.search(r"resuming from .*checkpoint-%d\b" % killed_at, err), err[-2000:]
    epochs = _trained_epochs(err)
    assert epochs and epochs[-1] == EPOCHS and min(epochs) > 1     # it did not start over from epoch 1
    assert len(epochs) < len(_trained_epochs(ref_err)) == EPOCHS
    if steps_per_epoch:
        assert min(epochs) == killed_at // steps_per_epoch + 1
    # Tolerance: exact. Same weights bit for bit, so every metric is equal.
    assert _weights_sha(out) == _weights_sha(ref)
    for key in ignore:
        ref_metrics.pop(key), metrics.pop(key)
    assert metrics == ref_metrics
    assert not list(out.parent.glob(f".{out.name}.*"))              # checkpoints and temporaries are gone


def test_finetune_resumes_after_sigkill(setup):
    root, recipe = setup["root"], setup["recipe"]
    reference = _run(_command("finetune", recipe, root / "ref" / "finetune"))
    out = root / "killed" / "finetune"
    killed_at = _kill_after_first_checkpoint(_command("finetune", recipe, out), out)
    _assert_nothing_looks_complete(out)
    resumed = _run(_command("finetune", recipe, out))
    _check_resumed(reference, resumed, killed_at, out, root / "ref" / "finetune")
    setup["teacher"] = root / "ref" / "finetune"


def test_distill_resumes_after_sigkill(setup):
    root, recipe = setup["root"], setup["recipe"]
    teacher = setup.get("teacher")
    if teacher is None:  # run alone: fine-tune the teacher first
        teacher = root / "ref" / "finetune"
        _run(_command("finetune", recipe, teacher))
    reference = _run(_command("distill", recipe, root / "ref" / "distill", teacher))
    out = root / "killed" / "distill"
    killed_at = _kill_after_first_checkpoint(_command("distill", recipe, out, teacher), out)
    _assert_nothing_looks_complete(out)
    resumed = _run(_command("distill", recipe, out, teacher))
    # The killed run had already cached the teacher's logits; the rerun reads them (the one expected difference).
    assert resumed[0]["teacher_cache_hit"] is True and reference[0]["teacher_cache_hit"] is False
    _check_resumed(reference, resumed, killed_at, out, root / "ref" / "distill", ignore=("teacher_cache_hit",))
    setup["student"] = root / "ref" / "distill"


# `edgekd compress` in its own process, with the search cut to one pruning level per axis and no
# quantization, three candidates to export and time, so that a run takes well under a minute; otherwise
# the real command (the quantized candidates are kept the same way, tests/test_compress.py).
SEARCH = ("import sys; from edgekd.compress import search; from edgekd.compress.prune import PruneSpec; "
          "search.AXES = ((PruneSpec(ffn=0.5),), (PruneSpec(layers=1),)); from edgekd.cli import main; "
          "sys.exit(main(sys.argv[1:]))")


def _search_command(recipe: Path, setup: dict, out: Path) -> list[str]:
    return [sys.executable, "-c", SEARCH, "compress", "--recipe", str(recipe), "--student", str(setup["student"]),
            "--teacher", str(setup["teacher"]), "--out", str(out), "--json"]


def _evaluated(stderr: str) -> tuple[list[str], list[str]]:
    """(candidates the run evaluated, candidates it read back from the killed run's checkpoints)."""
    rows = re.findall(r"search: (\S+): accuracy .*?( \(done before the rerun\))?$", stderr, re.M)
    return [name for name, again in rows if not again], [name for name, again in rows if again]


def _kill_while_recovering(argv: list[str], out: Path) -> Path:
    """Start the search, SIGKILL it once the second pruning level's recovery has a complete Trainer checkpoint
    (two candidates and the first level are done by then); return the search's checkpoint folder."""
    recovering = f".{out.name}.checkpoints-*/recovery/prune-layers1/checkpoint-*/trainer_state.json"
    _kill_when(argv, lambda: list(out.parent.glob(recovering)), "recovery checkpoint of the second level")
    [folder] = out.parent.glob(f".{out.name}.checkpoints-*")
    return folder


def test_search_resumes_after_sigkill(setup):
    root = setup["root"]
    if "teacher" not in setup:  # run alone: fine-tune and distill first
        setup["teacher"] = root / "ref" / "finetune"
        _run(_command("finetune", setup["recipe"], setup["teacher"]))
    if "student" not in setup:
        setup["student"] = root / "ref" / "distill"
        _run(_command("distill", setup["recipe"], setup["student"], setup["teacher"]))
    recipe = yaml.safe_load(setup["recipe"].read_text())
    # A budget every candidate meets, so that the choice is made among all of them; the size objective, so
    # that the choice does not hang on timing noise; recovery epochs enough to be killed in the middle of one.
    recipe["compress"] = {"search_quant": ["fp32"], "recovery_epochs": 8, "budget": 100, "objective": "size"}
    (root / "search.yaml").write_text(yaml.safe_dump(recipe))
    ref, out = root / "ref-search" / "compress", root / "killed-search" / "compress"
    ref.parent.mkdir(), out.parent.mkdir()
    # The uninterrupted reference runs beside the killed and resumed runs (they share no folder).
    reference = subprocess.Popen(_search_command(root / "search.yaml", setup, ref), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_env())
    try:
        folder = _kill_while_recovering(_search_command(root / "search.yaml", setup, out), out)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*/manifest.json"))
        done = sorted(p.stem for p in folder.glob("results/*.json") if p.stem != "teacher")
        assert done == ["fp32", "prune-ffn50+fp32"] and (folder / "models/prune-ffn50").is_dir()
        checkpoints = list(folder.glob("recovery/prune-layers1/checkpoint-*"))
        assert len(checkpoints) == 1, "the second level was saved before the kill landed: kill sooner"

        # A search left by another recipe (another key) with poisoned results: the rerun must not read it.
        stale = out.parent / f".{out.name}.checkpoints-{'0' * 16}"
        shutil.copytree(folder, stale)
        for file in stale.glob("results/*.json"):
            file.write_text(json.dumps({"accuracy": 0.0}))

        metrics, err = _run(_search_command(root / "search.yaml", setup, out))
        ref_out, ref_err = reference.communicate(timeout=300)
    finally:
        reference.kill()  # still running only when something above failed
        reference.wait()
    assert reference.returncode == 0, ref_err[-3000:]
    ref_metrics = json.loads(ref_out)

    # It resumed: said so, read the two candidates back, continued the level's recovery where it stopped.
    assert "resuming search: 2 of at most 3 candidates done" in err, err[-2000:]
    assert re.search(r"resuming from %s\b" % re.escape(str(checkpoints[0])), err), err[-2000:]
    fresh, reread = _evaluated(err)
    assert reread == done and fresh == ["prune-layers1+fp32"]
    assert _evaluated(ref_err) == (done + fresh, [])
    assert len(_trained_epochs(err)) < 8 < len(_trained_epochs(ref_err)) == 16

    # Same result. Tolerance: exact for all but latency, which the rerun measured again.
    for run in (metrics, ref_metrics):
        assert all(row["latency_p50_ms"] > 0 for row in run["search"]["measured"])
        for row in run["search"]["candidates"] + run["search"]["measured"]:
            row.pop("latency_p50_ms")
    assert metrics == ref_metrics
    assert _weights_sha(out) == _weights_sha(ref)
    assert list(out.parent.glob(f".{out.name}.*")) == [stale]  # its own checkpoints are gone, not another's


def test_a_checkpoint_cut_short_by_the_kill_is_passed_over(tmp_path, capsys):
    """SIGKILL while the Trainer writes checkpoint-N leaves it without (or with half) trainer_state.json,
    which the Trainer writes last: resuming picks the newest complete one instead of failing on it."""
    from edgekd.distill.training import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    for step, state in ((12, '{"global_step": 12}'), (24, None), (36, '{"global_st'), (8, '{"global_step": 8}')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")
    assert "resuming from" in capsys.readouterr().err
