"""What gets installed: every package folder, and the shipped configs under
the dsmoe namespace (dsmoe.configs), never as a top-level ``configs``."""

import os
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setuptools():
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_installed_and_configs_only_under_dsmoe():
  tool = _setuptools()
  folders = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
             for top in ("dsmoe", "pallas_kernels") for p in (ROOT / top).rglob("__init__.py")}
  assert folders | {"dsmoe.configs"} == set(tool["packages"])
  assert tool["package-dir"] == {"dsmoe.configs": "configs"}
  assert not any(p == "configs" or p.startswith("configs.") for p in tool["packages"])


def test_a_users_configs_folder_does_not_shadow_the_shipped_ones(tmp_path):
  """In a folder with its own configs/tiny.py, dsmoe.load("tiny") still reads
  the shipped one (and the user's own is loaded by its path)."""
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("")
  (tmp_path / "configs" / "tiny.py").write_text(
      "from dsmoe.config import base_config\n"
      "def get_config(arg=None):\n  c = base_config()\n  c.model.d_model = 8\n  return c\n")
  code = ("import dsmoe\n"
          "print(dsmoe.load('tiny').model.d_model, dsmoe.load('configs/tiny.py').model.d_model)\n"
          "import dsmoe.configs.tiny\n"
          "print(dsmoe.configs.tiny.__file__)\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  sizes, path = res.stdout.split("\n")[:2]
  assert sizes == "128 8"
  assert os.path.samefile(path, ROOT / "configs" / "tiny.py")
