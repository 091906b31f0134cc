"""Tables of results: markdown for the docs and the terminal, CSV for the data behind a figure.

The one place the analyses, benchmarks and figure scripts format their tables.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from m1jax import files


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are written with str()."""
  lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Writes a header line and the rows to `path` (its folder is created), whole: a benchmark
  killed while rewriting its CSV keeps the previous one."""
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  files.write_atomically(path, text.getvalue())
