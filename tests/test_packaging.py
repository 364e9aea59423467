"""What gets installed: every package folder, and the shipped configs under
the dsmoe namespace (dsmoe.configs), never as a top-level ``configs``."""

import ast
import importlib.metadata
import os
import pathlib
import re
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


def _requirements(path):
  """The requirement lines of a requirements file (comments and blanks left out)."""
  lines = (l.strip() for l in (ROOT / path).read_text().splitlines())
  return [l for l in lines if l and not l.startswith("#")]


def _imported_top_level_modules():
  """Every top-level module the library's code imports (dsmoe/, pallas_kernels/)."""
  names = set()
  for top in ("dsmoe", "pallas_kernels"):
    for path in (ROOT / top).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"dsmoe", "pallas_kernels", "__future__"}


# Not named in requirements.txt: jaxlib comes with jax; scipy_openblas32 is
# the cpu-kernel extra's, imported only when that kernel is asked for.
OPTIONAL_IMPORTS = {"jaxlib", "scipy_openblas32"}


def test_the_runtime_dependencies_cover_what_the_library_imports():
  """requirements.txt (pyproject.toml's dependencies) names a distribution
  for every module the library imports: a wheel installed alone has what it
  needs. The test tools stay out of it."""
  declared = {re.split(r"[<>=\[ ;]", r)[0].lower().replace("_", "-")
              for r in _requirements("requirements.txt")}
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for module in _imported_top_level_modules() - OPTIONAL_IMPORTS:
    dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
    if not dists & declared:
      missing[module] = sorted(dists)
  assert not missing, f"imported but not in requirements.txt: {missing}"
  assert not declared & {"pytest", "torch", "transformers", "nbclient"}
  with open(ROOT / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["dynamic"] == ["dependencies"] and project["license"] == "Apache-2.0"
  assert {"test", "tpu", "cuda", "cpu-kernel"} <= set(project["optional-dependencies"])
  assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
