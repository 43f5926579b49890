"""Native runtimes (ExecuTorch, XNNPACK, LiteRT, TFLite Micro) log from C++ straight to file descriptor 2.

Python's logging cannot stop those lines (`[cpuinfo_utils.cpp:71] Reading file ...`, `INFO: Created TensorFlow
Lite XNNPACK delegate for CPU.`), so the calls that emit them (importing the runtime, loading a program, the
first allocation) run with fd 2 pointed at a temporary file. Afterwards, lines that report an error are passed
on to the terminal; the rest go to the `edgekd.native` logger at DEBUG level.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

_log = logging.getLogger("edgekd.native")
# A real problem, whatever the runtime: kept on the terminal. cpuinfo's probes of files that only exist on
# ARM boards ("Failed to open midr file") are routine on every other machine, so they are not errors.
_ERROR = re.compile(r"\b(error|fatal|abort(ed)?|fail(ed|ure)?)\b", re.IGNORECASE)
_ROUTINE = re.compile(r"cpuinfo_utils\.cpp|^INFO: ")


def is_error_line(line: str) -> bool:
    return bool(_ERROR.search(line)) and not _ROUTINE.search(line)


@contextlib.contextmanager
def native_stderr_filtered():
    """Capture what native code writes to fd 2 inside the block; pass on only its error lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (a daemon): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if is_error_line(line):
                    print(line, file=sys.stderr)
                elif line.strip():
                    _log.debug("%s", line)
