"""m1jax.files: a file is replaced whole or left as it was."""

import os

import pytest

from m1jax import files


def test_write_atomically_replaces_whole_or_keeps_the_old_file(tmp_path):
  path = tmp_path / "sub" / "result.csv"
  files.write_atomically(str(path), "a,b\n1,2\n")  # the folder is created
  assert path.read_text() == "a,b\n1,2\n"
  with pytest.raises(TypeError):
    files.write_atomically(str(path), None)  # fails after the temporary file is opened
  assert path.read_text() == "a,b\n1,2\n"
  assert os.listdir(path.parent) == ["result.csv"]  # no temporary file left behind
