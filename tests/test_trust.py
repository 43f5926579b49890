"""Safe loading: no pickle is unpickled, no model code runs, no archive writes outside its folder.

The malicious files here would create a marker file if anything executed them; every test checks
the marker is absent after edgekd has refused (and, as a control, that the payload really works).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from edgekd.cli import main
from edgekd.errors import ModelError
from edgekd.models import load_classifier, load_tokenizer, model_fingerprint, resolve_model
from edgekd.recipe import recipe_from_dict
from edgekd.safe_extract import ArchiveError, safe_extract


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _tiny_config_dir(path: Path) -> Path:
    from transformers import BertConfig

    path.mkdir(parents=True, exist_ok=True)
    BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, num_labels=3).save_pretrained(path)
    return path


def _plant_malicious_bin(folder: Path, marker: Path, legacy: bool = False) -> Path:
    """A `pytorch_model.bin` that looks like a state dict and runs code when fully unpickled."""
    weights = {"bert.embeddings.word_embeddings.weight": torch.zeros(120, 32), "payload": _Payload(marker)}
    file = folder / "pytorch_model.bin"
    if legacy:  # a raw pickle stream (the pre-1.6 format), not torch's zip container
        file.write_bytes(pickle.dumps(weights, protocol=2))
    else:
        torch.save(weights, file)
    return file


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_payload_really_runs_when_unpickled(tmp_path, legacy):
    """Control: the planted file is dangerous, so the tests below prove something."""
    folder = _tiny_config_dir(tmp_path / "model")
    marker = tmp_path / "control-marker"
    file = _plant_malicious_bin(folder, marker, legacy)
    if legacy:
        pickle.loads(file.read_bytes())
    else:
        torch.load(file, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_without_the_flag(tmp_path, legacy):
    folder = _tiny_config_dir(tmp_path / "model")
    marker = tmp_path / "MARKER"
    _plant_malicious_bin(folder, marker, legacy)
    for call in (lambda: resolve_model(str(folder)), lambda: load_classifier(str(folder), ["a", "b"]),
                 lambda: model_fingerprint(str(folder)), lambda: load_tokenizer(str(folder))):
        with pytest.raises(ModelError, match="only pickle weights.*--allow-pickle"):
            call()
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_by_weights_only_with_the_flag(tmp_path, legacy):
    folder = _tiny_config_dir(tmp_path / "model")
    marker = tmp_path / "MARKER"
    _plant_malicious_bin(folder, marker, legacy)
    with pytest.raises(ModelError) as info:
        load_classifier(str(folder), ["a", "b"], allow_pickle=True)
    message = str(info.value)
    assert "pytorch_model.bin was refused by weights-only loading" in message and "\n" not in message
    if not legacy:
        assert "posix.system" in message      # torch names the global it blocked
    assert not marker.exists()


def _cli_recipe(tmp_path: Path, teacher: Path, small_data) -> Path:
    recipe = {"version": 1, "teacher": {"model": str(teacher), "epochs": 1},
              "student": {"layers": [0, 1]},  # the pre-flight checks the student against the 2-layer teacher
              "data": {"train": str(small_data["train"]), "validation": str(small_data["validation"]),
                       "test": str(small_data["test"])}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_finetune_on_a_malicious_pickle_teacher(tmp_path, small_data, capsys):
    """Without the flag the refusal names it; with it, weights_only refuses; neither runs the payload."""
    folder = _tiny_config_dir(tmp_path / "model")
    from transformers import AutoTokenizer

    from edgekd.models import builtin_model_dir

    AutoTokenizer.from_pretrained(builtin_model_dir()).save_pretrained(folder)
    marker = tmp_path / "MARKER"
    _plant_malicious_bin(folder, marker)
    recipe = _cli_recipe(tmp_path, folder, small_data)
    for extra, expected in (([], "--allow-pickle"), (["--allow-pickle"], "refused by weights-only loading")):
        code = main(["finetune", "--recipe", str(recipe), "--out", str(tmp_path / "ft"), *extra])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and expected in errors[0], err
        assert "Traceback" not in err
        assert not (tmp_path / "ft").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.")]  # no temporary stage left
    assert not marker.exists()


def test_allow_pickle_loads_a_plain_state_dict_like_safetensors(tmp_path):
    """The flag's purpose: an honest .bin-only folder loads, with the same weights."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)).eval()
    folder = tmp_path / "model"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    torch.save({"not": "weights"}, folder / "training_args.bin")  # HF Trainer leaves this beside the weights
    loaded = load_classifier(str(folder), allow_pickle=True).eval()
    ids = torch.randint(0, 120, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    relabelled = load_classifier(str(folder), ["x", "y"], allow_pickle=True)  # a new head of another size
    assert relabelled.config.id2label == {0: "x", 1: "y"} and relabelled.classifier.out_features == 2
    # The pickle weights are part of the model's fingerprint (a changed .bin changes the stage key).
    before = model_fingerprint(str(folder), allow_pickle=True)["sha256"]
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    assert model_fingerprint(str(folder), allow_pickle=True)["sha256"] != before


def test_allow_pickle_rejects_a_file_that_is_not_a_state_dict(tmp_path):
    folder = _tiny_config_dir(tmp_path / "model")
    torch.save([torch.zeros(2)], folder / "model.pt")
    with pytest.raises(ModelError, match="model.pt is not a state dict"):
        load_classifier(str(folder), allow_pickle=True)
    (folder / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match="model.pt was refused by weights-only loading"):
        load_classifier(str(folder), allow_pickle=True)


def test_allow_pickle_flag_and_recipe_fields():
    from edgekd.cli import _recipe, build_parser

    recipe = recipe_from_dict({"version": 1})
    assert recipe.teacher.allow_pickle is False and recipe.student.allow_pickle is False
    assert recipe_from_dict({"teacher": {"allow_pickle": True}}).teacher.allow_pickle is True
    for command in (["finetune", "--out", "o"], ["distill", "--teacher", "t", "--out", "o"], ["run", "r.yaml",
                                                                                                "--out", "o"]):
        args = build_parser().parse_args([*command, "--allow-pickle"])
        assert args.allow_pickle is True
    args = build_parser().parse_args(["finetune", "--out", "o", "--allow-pickle"])
    recipe = _recipe(None, args)
    assert recipe.teacher.allow_pickle and recipe.student.allow_pickle


# --- trust_remote_code --------------------------------------------------------------------------

def test_trust_remote_code_is_off_by_default_and_custom_code_never_runs(tmp_path):
    assert recipe_from_dict({"version": 1}).teacher.trust_remote_code is False
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForSequenceClassification": "modeling_evil.Evil",
                "AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    tokenizer_map = {"auto_map": {"AutoTokenizer": auto_map["AutoTokenizer"]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_map))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="ships its own Python code.*teacher.trust_remote_code: true"):
        load_classifier(str(folder), ["a", "b"])
    with pytest.raises(ModelError, match="ships its own Python code"):
        load_tokenizer(str(folder))
    assert not marker.exists()


# --- archives -------------------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (kind, name, data or link target); kind is file, dir, sym, hard or fifo."""
    with tarfile.open(path, "w:gz") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = data
            tar.addfile(info)
    return path


def test_safe_extract_unpacks_a_good_tar_and_zip(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", [("dir", "bundle", b""), ("file", "bundle/model.pte", b"pte"),
                                            ("file", "bundle/sub/labels.json", b"[]"),
                                            ("sym", "bundle/latest.pte", "model.pte")])
    out = safe_extract(good, tmp_path / "out")
    assert (out / "bundle" / "model.pte").read_bytes() == b"pte"
    assert (out / "bundle" / "latest.pte").read_bytes() == b"pte"
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as zf:
        zf.writestr("a/b.txt", "hello")
    assert (safe_extract(tmp_path / "good.zip", tmp_path / "zout") / "a" / "b.txt").read_text() == "hello"


@pytest.mark.parametrize("members", [
    [("file", "/tmp/edgekd-abs-escape", b"x")],
    [("file", "../escape.txt", b"x")],
    [("file", "bundle/../../escape.txt", b"x")],
    [("sym", "bundle/link", "/etc/passwd")],
    [("sym", "bundle/link", "../../outside")],
    [("dir", "d", b""), ("sym", "d/up", ".."), ("sym", "d/up2", "up/..")],
    [("hard", "bundle/hard", "../../etc/passwd")],
    [("fifo", "bundle/pipe", b"")],
], ids=["absolute", "dotdot", "nested-dotdot", "symlink-absolute", "symlink-dotdot", "symlink-chain", "hardlink",
        "fifo"])
def test_safe_extract_rejects_members_leaving_the_folder(tmp_path, members):
    archive = _tar(tmp_path / "evil.tar.gz", [("file", "ok.txt", b"fine"), *members])
    with pytest.raises(ArchiveError, match="was not unpacked"):
        safe_extract(archive, tmp_path / "target" / "out")
    assert not (tmp_path / "target" / "out").exists()
    assert not list((tmp_path / "target").iterdir())              # no temporary folder left either
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/edgekd-abs-escape").exists()


def test_safe_extract_rejects_zip_escapes_and_damaged_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ArchiveError, match="leaves the target folder"):
        safe_extract(tmp_path / "evil.zip", tmp_path / "out")
    link = zipfile.ZipInfo("link")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match="link or special file"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out")
    good = _tar(tmp_path / "good.tar.gz", [("file", f"f{i}", os.urandom(2000)) for i in range(5)])
    (tmp_path / "cut.tar.gz").write_bytes(good.read_bytes()[:700])
    with pytest.raises(ArchiveError):
        safe_extract(tmp_path / "cut.tar.gz", tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"not an archive")
    with pytest.raises(ArchiveError, match="not a tar or zip archive"):
        safe_extract(tmp_path / "junk.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_nothing_in_edgekd_unpickles_without_weights_only():
    """A source scan: every torch.load names weights_only=True; no pickle.load(s) at all."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for file in root.rglob("*.py"):
        if any(part in {"tests", ".venv", "venv", "build", "runs"} or part.startswith(".") for part in
               file.relative_to(root).parts[:-1]):
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if ("torch.load(" in code and "weights_only=True" not in code) or "pickle.load" in code:
                offenders.append(f"{file.relative_to(root)}:{number}")
    assert not offenders, offenders
