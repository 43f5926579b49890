"""Kill -9 mid-training, rerun the same command: it resumes from the last checkpoint and ends where an
uninterrupted run with the same seed ends.

Each stage runs three times as a real `edgekd` subprocess: once uninterrupted (the reference), once
killed with SIGKILL as soon as its first checkpoint is complete, and once more with the same command.
Tolerance, found on CPU: none needed. The Trainer restores model, optimizer, scheduler, RNG states and
data order from the checkpoint, so the resumed run's weights are bit-identical to the reference's
(same sha256 in the manifest) and its metrics are equal, not just close.

The compression search (issue part 3) does not exist yet; `compress` trains nothing, so it has no
checkpoint to resume from.
"""
from __future__ import annotations

import json
import os
import re
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
    return sorted(out.parent.glob(f".{out.name}.checkpoints-*/checkpoint-*/trainer_state.json"))


def _kill_after_first_checkpoint(argv: list[str], out: Path) -> int:
    """Start the command, SIGKILL it once a checkpoint is complete; return the checkpoint's step."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not _complete_checkpoints(out):
            assert proc.poll() is None, f"finished before any checkpoint: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = [int(p.parent.name.split("-")[1]) for p in _complete_checkpoints(out)]
    return max(steps)


def _assert_nothing_looks_complete(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*/manifest.json"))  # not even the temporary stage got that far
    assert _complete_checkpoints(out)                             # but the checkpoint survived


def _trained_epochs(stderr: str) -> list[float]:
    """The epochs a run trained, from the Trainer's per-epoch log lines ({'loss': ..., 'epoch': ...})."""
    return [float(m) for m in re.findall(r"\{'loss': [^}]*'epoch': '([0-9.]+)'", stderr)]


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
