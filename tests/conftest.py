"""Shared test helpers: load config files, small model configs."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
  """configs/<name>.py -> get_config(arg)."""
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture
def tiny_config():
  return load_config("tiny")
