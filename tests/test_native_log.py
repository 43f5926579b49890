"""Native runtimes' C++ log lines (ExecuTorch's cpuinfo probes, LiteRT's INFO lines) stay off the user's terminal."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edgekd.targets.native_log import is_error_line, native_stderr_filtered

NOISE = ("cpuinfo_utils.cpp", "INFO: Created TensorFlow Lite", "Failed to open midr file")


def test_only_error_lines_written_to_fd_2_pass(capfd):
    with native_stderr_filtered():
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"E 00:00:00.012 executorch:method.cpp:1100] Error: Missing operator: aten::foo\n")
    err = capfd.readouterr().err
    assert err.splitlines() == ["E 00:00:00.012 executorch:method.cpp:1100] Error: Missing operator: aten::foo"]
    assert is_error_line("ERROR: tensor arena too small") and not is_error_line("[cpuinfo_utils.cpp:125] CPU info")


def test_loading_a_tiny_pte_through_edgekds_runner_prints_no_native_lines(tmp_path):
    pytest.importorskip("executorch")
    script = textwrap.dedent(f"""
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
            def forward(self, ids, mask):
                return self.head((self.embed(ids) * mask.unsqueeze(-1)).mean(1))

        inputs = (torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8, dtype=torch.int32))
        program = torch.export.export(Tiny().eval(), inputs)
        pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        open({str(tmp_path / "tiny.pte")!r}, "wb").write(pte.buffer)
        import sys
        print("--- load ---", file=sys.stderr, flush=True)
        from edgekd.targets.executorch import ExecuTorchRunner
        runner = ExecuTorchRunner({str(tmp_path / "tiny.pte")!r})
        print(runner(*inputs).shape, file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, result.stderr[-2000:]
    after_load = result.stderr.split("--- load ---", 1)[1]
    assert after_load.strip() == "(1, 3)", after_load  # the runner's load and first run: nothing but our line
