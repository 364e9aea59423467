"""Executes every notebook headless with nbclient (a real Jupyter kernel).

The install cell (tag "install": clone + pip) is left out; the kernel imports
dsmoe from this checkout (PYTHONPATH) and runs in an empty folder, so the
notebooks must load configs from the installed package, not the current
folder. ``DSMOE_NOTEBOOK_TEST=1`` makes their runs short. The notebooks run
at the same time, one kernel each, so they overlap on the cores.
"""

import asyncio
import json
import os
import pathlib

import pytest

from tests.helpers import ROOT, selected_params

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 100_000  # saved notebooks stay small (no large outputs)


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
  """Every selected notebook, executed concurrently: {path: (notebook with its
  outputs, the exception its execution raised or None)}."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  paths = selected_params(request, "test_notebook_runs", "path")
  env = {**os.environ, "DSMOE_NOTEBOOK_TEST": "1", "PYTHONPATH": str(ROOT)}

  async def execute(path):
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if "install" not in c.metadata.get("tags", [])]
    folder = tmp_path_factory.mktemp(path.stem)  # the kernel's (empty) working folder
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    try:
      await client.async_execute(env=env)
    except Exception as e:  # pylint: disable=broad-except  (CellExecutionError: cell, traceback)
      return nb, e
    return nb, None

  async def execute_all():
    return await asyncio.gather(*(execute(p) for p in paths))

  return dict(zip(paths, asyncio.run(execute_all())))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, executed):
  nb, failure = executed[path]
  if failure is not None:
    raise failure  # CellExecutionError names the cell and shows its traceback
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors


def test_notebooks_start_with_an_install_cell_and_are_small():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "expert_specialization.ipynb"}
  for path in NOTEBOOKS:
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: clear its large outputs"
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first = "".join(cells[0]["source"])
    assert "install" in cells[0]["metadata"].get("tags", []), path.name
    assert "git" in first and "pip" in first and "--no-deps" in first, path.name
    assert not any('open("configs' in "".join(c["source"]) for c in cells)
