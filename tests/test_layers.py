"""The package's layers keep to their rooms: I/O never imports a kernel, kernels never
import I/O or the format, and the command line's parser loads neither."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(statement: str) -> set:
    """The kenstream modules (and heavy libraries) a fresh interpreter has after ``statement``."""
    code = (f"import sys\n{statement}\nimport json\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('kenstream', "
            "'numba', 'torch', 'matplotlib')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


IO_MODULES = ["checkpoint", "safetensors_file", "rows", "writer", "outputs", "jsonfile",
              "diff_reader", "fingerprint", "safefs", "extras", "torch_bin", "readahead"]


@pytest.mark.parametrize("module", IO_MODULES)
def test_io_never_imports_a_kernel(module):
    loaded = loaded_after(f"import kenstream.io.{module}")
    assert not {m for m in loaded if m.startswith(("kenstream.kernels", "kenstream.engine"))}
    assert "numba" not in loaded


def test_kernels_import_neither_io_nor_format():
    loaded = loaded_after("import kenstream.kernels.ken, kenstream.kernels.baselines, "
                          "kenstream.kernels.pack")
    assert not {m for m in loaded if m.startswith(("kenstream.io", "kenstream.format",
                                                   "kenstream.engine", "kenstream.viz"))}


def test_the_parser_loads_no_kernel_and_no_plotting():
    loaded = loaded_after("from kenstream.cli import build_parser; build_parser()")
    assert not {"numba", "torch", "matplotlib"} & {m.split(".")[0] for m in loaded}
    assert not {m for m in loaded if m.startswith(("kenstream.kernels", "kenstream.engine"))}


def test_the_settings_bound_is_the_formats():
    from kenstream import settings
    from kenstream.format import spec

    assert settings.MAX_COUNT == spec.MAX_COUNT
