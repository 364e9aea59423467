"""Where documents come from: the local_text builder or a named TFDS dataset.

Both give a TFDS builder whose splits are read with random access
(``builder.as_data_source``, array_record files, no TensorFlow). Named
datasets are never downloaded at run time: one that is not prepared in
``data.data_dir`` raises a single error explaining how to prepare it.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from dsmoe import errors
from dsmoe.data import local_text

# A requested split -> the splits tried in order (first one that exists).
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "test"),
                 "test": ("test", "validation")}


@dataclasses.dataclass
class Source:
  """A prepared TFDS builder and which feature holds the text."""
  builder: tfds.core.DatasetBuilder
  text_key: str
  key: str  # config key that chose the dataset, for error messages

  @property
  def dataset_id(self) -> str:
    """"name/config/version": identifies the data, e.g. for tokenizer caches."""
    return self.builder.info.full_name

  def split_name(self, split: str) -> str:
    """The builder's split for `split` ("validation" falls back to "test")."""
    available = list(self.builder.info.splits.keys())
    for name in SPLIT_ALIASES.get(split, (split,)):
      if name in available:
        return name
    hint = (" (a small local_text corpus may have no validation files: raise "
            "data.validation_percent)" if self.key == "data.text_dir" else "")
    raise errors.DataError(f"{self.key}: dataset {self.dataset_id!r} has no split "
                     f"{split!r}; it has {available}{hint}")

  def data_source(self, split: str):
    """Random-access records of `split` (len() and [i] -> dict of features)."""
    try:
      records = self.builder.as_data_source(split=self.split_name(split))
    except NotImplementedError:
      raise errors.DataError(
          f"{self.key}: dataset {self.dataset_id!r} in {self.builder.data_dir!r} "
          "is not in the array_record format, which random access needs; prepare "
          "it again with file_format='array_record'") from None
    fix = ("delete that folder to build it again" if self.key == "data.text_dir" else
           "prepare the dataset again (see docs/DATA.md)")
    return Records(records, f"{self.key}: the {split!r} split of {self.dataset_id!r} in "
                   f"{self.builder.data_dir}", fix)


class Records:
  """A TFDS data source whose read errors (a damaged array_record file) are
  one DataError naming the dataset, its folder and what to do."""

  def __init__(self, records, where: str, fix: str):
    self._records, self._where, self._fix = records, where, fix

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    try:
      return self._records[index]
    except (RuntimeError, OSError) as e:
      raise errors.DataError(f"{self._where}: record {index} cannot be read ({errors.short(e)}); "
                       f"the files are damaged: {self._fix}") from e


def prepare_help(name: str, data_dir: str) -> str:
  """How to prepare a named TFDS dataset for offline use (one line)."""
  return (
      f"on a machine with internet access run: python -c \"import tensorflow_datasets "
      f"as tfds; tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record')"
      f".download_and_prepare()\" (or: tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record), then copy that folder here and set data.data_dir "
      f"to it; datasets that need a manual download read their files from "
      f"{data_dir}/downloads/manual. See docs/DATA.md")


def named_source(name: str, data_dir: str, text_key: str) -> Source:
  """A named TFDS dataset already prepared in `data_dir` (never downloads)."""
  data_dir = os.path.abspath(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.DataError(f"data.tfds_name={name!r}: TFDS has no dataset of that "
                     "name (or its builder cannot be imported without "
                     "TensorFlow); check the name, e.g. 'lm1b', 'c4/en', "
                     "'tiny_shakespeare'") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.tfds_name={name!r} is not prepared in data.data_dir={data_dir!r}, "
        f"and nothing is downloaded at run time; " + prepare_help(name, data_dir))
  missing = [str(p) for split in builder.info.splits.values() for p in split.filepaths
             if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"data.tfds_name={name!r}: the prepared copy in {builder.data_dir!r} is "
        f"incomplete: {missing[0]} is missing ({len(missing)} file(s) in all); prepare "
        "the dataset again (see docs/DATA.md)")
  features = builder.info.features
  if text_key not in features:
    raise errors.DataError(f"data.text_key={text_key!r}: dataset {name!r} has no such "
                     f"feature; it has {sorted(features.keys())}")
  return Source(builder, text_key, key="data.tfds_name")


def open_source(d) -> Source:
  """The Source chosen by the `config.data` block (local_text by default)."""
  if d.tfds_name:
    return named_source(d.tfds_name, d.data_dir, d.text_key)
  builder = local_text.local_text_builder(
      d.text_dir, d.data_dir, file_glob=d.file_glob,
      validation_percent=d.validation_percent)
  return Source(builder, "text", key="data.text_dir")
