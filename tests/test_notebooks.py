"""Executes every notebook's code cells in order (no Jupyter needed)."""

import json
import pathlib

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, monkeypatch, tmp_path):
  monkeypatch.setenv("DSMOE_NOTEBOOK_TEST", "1")
  monkeypatch.setenv("DSMOE_ROOT", str(ROOT))
  monkeypatch.chdir(tmp_path)
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  assert cells, f"{path} has no code cells"
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102


def test_notebooks_exist():
  assert NOTEBOOKS, "notebooks/ should hold at least the quickstart"
