"""What a budget search has done so far, kept on disk so that a killed search resumes instead of restarting.

The folder sits beside the stage directory and is named by the stage key
(`.NAME.checkpoints-KEY`, as distill's Trainer checkpoints), so a changed recipe or input starts
a fresh search and never reads a stale one. It holds:

    results/NAME.json     one per evaluated candidate: its accuracy, or why it was skipped
    models/NAME/          a trained model: a pruning level's recovered student, a quantization-aware one
                          (save_pretrained: safetensors, never pickle)
    recovery/NAME/        the Trainer checkpoints of the model being trained, removed once it is saved
    measured.json         sizes and latencies of the final timing round, once it is complete

Every file or folder is written under a temporary name and renamed into place, so a kill leaves
either the whole entry or none of it. With `folder=None` the state lives in memory only.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from edgekd.errors import EdgeKDError
from edgekd.manifest import atomic_write_text


class SearchState:
    def __init__(self, folder: Path | None):
        self.folder = folder
        self.results: dict[str, dict] = {}
        self.reused: set[str] = set()  # names answered from the folder: a resumed run did not redo them
        for file in sorted(folder.glob("results/*.json")) if folder is not None else []:
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict) and (isinstance(record.get("accuracy"), float) or
                                             isinstance(record.get("skipped"), str)):
                self.results[file.stem] = record
            # anything else (unreadable, edited): evaluate that candidate again rather than fail the run
        self.loaded = set(self.results)  # what an earlier run left

    def remember(self, name: str, compute: Callable[[], dict]) -> dict:
        """The recorded result `name`, or compute it and record it as soon as it exists."""
        if name in self.results:
            if name in self.loaded:
                self.reused.add(name)
            return self.results[name]
        result = compute()
        self.results[name] = result
        if self.folder is not None:
            (self.folder / "results").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "results" / f"{name}.json", json.dumps(result))
        return result

    def model(self, name: str, train: Callable[[Path | None], object]):
        """The trained model `name`: loaded if an earlier run saved it, else `train(checkpoints)` and saved.

        Its training resumes from its own Trainer checkpoint when a killed run left one. A model that cannot
        be made (EdgeKDError, e.g. a level that cannot be pruned) is recorded too, so a rerun skips it with the
        same message.
        """
        from edgekd.models import load_classifier

        if "skipped" in self.results.get(name, {}):
            self.reused.add(name)
            raise EdgeKDError(self.results[name]["skipped"])
        if self.folder is None:
            return train(None)
        saved = self.folder / "models" / name
        if saved.is_dir():
            self.reused.add(name)
            return load_classifier(str(saved)).eval()
        recovery = self.folder / "recovery" / name
        try:
            model = train(recovery)
        except EdgeKDError as exc:
            reason = str(exc)
            self.remember(name, lambda: {"skipped": reason})
            raise
        tmp = saved.parent / f".{saved.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        os.replace(tmp, saved)
        shutil.rmtree(recovery, ignore_errors=True)  # the saved model supersedes its training checkpoints
        return model

    def measured(self, names: list[str]) -> dict | None:
        """The last timing round's {name: {size_bytes, latency_ms}}, if it timed exactly `names`."""
        file = self.folder / "measured.json" if self.folder is not None else None
        try:
            rows = json.loads(file.read_text(encoding="utf-8")) if file is not None and file.is_file() else None
        except (OSError, ValueError):
            return None
        return rows if isinstance(rows, dict) and list(rows) == names else None

    def save_measured(self, rows: dict) -> None:
        if self.folder is not None:
            atomic_write_text(self.folder / "measured.json", json.dumps(rows))
