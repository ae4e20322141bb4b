"""Writes the example notebooks from their paired jupytext sources, and optionally runs them.

Each notebook ``NN_name.ipynb`` is generated from ``NN_name.py`` next to it: a plain Python
file in jupytext's percent format (``# %%`` starts a code cell, ``# %% [markdown]`` a
markdown cell), readable and diffable without Jupyter. Edit the ``.py`` file, never the
``.ipynb``, then regenerate:

    python notebooks/_build.py                 # write the .ipynb files (no outputs)
    python notebooks/_build.py --execute       # write, run with the default budget, save outputs
    python notebooks/_build.py --execute --fast 01 03   # only some, with the CI budget

``jupytext --to ipynb notebooks/01_quickstart_sinusoid.py`` gives the same cells (without
outputs). ``tests/test_notebooks.py`` checks that every ``.ipynb`` holds the cells of its
``.py`` source, and runs the notebooks with ``AMAML_NOTEBOOK_FAST=1``. Needs the
``notebooks`` extra (``pip install -e ".[notebooks]"``: jupytext, nbformat, nbclient,
ipykernel, matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
  """The notebooks' jupytext sources: ``NN_*.py`` in this folder, in order."""
  return sorted(HERE.glob("[0-9][0-9]_*.py"))


def build(source: str | os.PathLike) -> nbformat.NotebookNode:
  """The notebook (no outputs) that the percent-format file ``source`` describes."""
  nb = jupytext.read(source, fmt="py:percent")
  # keep the pairing ("formats", for `jupytext --sync`), drop what changes with jupytext's version
  nb.metadata.get("jupytext", {}).pop("text_representation", None)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  for i, cell in enumerate(nb.cells):  # stable ids (jupytext draws random ones): quiet diffs
    cell.id = f"cell-{i}"
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
  from nbclient import NotebookClient

  NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                 resources={"metadata": {"path": str(HERE)}}).execute()
  return nb


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
  ap.add_argument("--execute", action="store_true", help="run and save outputs")
  ap.add_argument("--fast", action="store_true", help="with AMAML_NOTEBOOK_FAST=1")
  args = ap.parse_args(argv)
  os.environ["AMAML_NOTEBOOK_FAST"] = "1" if args.fast else "0"
  for source in sources():
    if args.only and not any(source.name.startswith(p) for p in args.only):
      continue
    target = source.with_suffix(".ipynb")
    nb = build(source)
    if args.execute:
      t0 = time.perf_counter()
      execute(nb)
      print(f"{target.name}: executed in {time.perf_counter() - t0:.1f} s", flush=True)
    nbformat.validate(nb)
    nbformat.write(nb, target)
    print(f"wrote {target} from {source.name}", file=sys.stderr)


if __name__ == "__main__":
  main()
