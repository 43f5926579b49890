"""Module-level stand-ins for a variant's export, so that a spawned export process can unpickle them."""
import os
import time
from pathlib import Path

from edgekd.errors import GateError


def write_marker(path: str, seconds: float = 0.0) -> None:
    """An export that takes `seconds` and leaves one file: the pid of the process that made it, and when it
    started and ended (time.time())."""
    start = time.time()
    time.sleep(seconds)
    Path(path).write_text(f"{os.getpid()} {start} {time.time()}")


def refuse(name: str) -> None:
    raise GateError(f"{name} fails its export gate (on purpose)")


def die() -> None:
    os._exit(9)  # what the OOM killer leaves: no exception, no message
