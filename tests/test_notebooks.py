"""Every notebook runs top to bottom at a tiny size (IBAU_NOTEBOOK_SMOKE=1), as CI runs it."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def smoke_env(monkeypatch, tmp_path):
  monkeypatch.setenv("IBAU_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("IBAU_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  return tmp_path


def _execute(notebook, cwd):
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()


def test_the_two_notebooks_exist_and_have_no_committed_outputs():
  assert {p.name for p in NOTEBOOKS} >= {"ibau_quickstart.ipynb", "cifar10_tpu.ipynb"}
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, smoke_env):
  nb = nbformat.read(path, as_version=4)
  _execute(nb, smoke_env)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors


def test_a_broken_cell_fails_the_run(smoke_env):
  nb = nbformat.read(ROOT / "notebooks" / "ibau_quickstart.ipynb", as_version=4)
  nb.cells.insert(3, nbformat.v4.new_code_cell("raise RuntimeError('deliberately broken')"))
  with pytest.raises(CellExecutionError, match="deliberately broken"):
    _execute(nb, smoke_env)
