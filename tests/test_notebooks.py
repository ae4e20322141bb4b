"""Runs every example notebook top to bottom with the CI budget (``AMAML_NOTEBOOK_FAST=1``);
the two slowest only with ``-m slow``.

Each notebook runs in a fresh ``python3`` kernel started with this interpreter (jupyter
replaces the kernel spec's ``python`` by ``sys.executable``), must raise no error, and must
draw at least its expected number of figures.

Each ``notebooks/NN_name.ipynb`` is generated from its paired jupytext source
``notebooks/NN_name.py`` (percent format), and must hold exactly that file's cells. Edit the
``.py`` file, then regenerate with ``python notebooks/_build.py`` (add ``--execute`` to save
outputs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import slow_except

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# name -> (figures at least, text that some output must contain)
EXPECTED = {
  "01_quickstart_sinusoid.ipynb": (3, "after 10 steps"),
  "02_omniglot.ipynb": (2, "meta-test accuracy on"),
  "03_hypergradient_explained.ipynb": (3, "closed form"),
  "04_sensitivity.ipynb": (2, "runs x"),
}


def test_every_notebook_is_tested():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
  sources = sorted(p.with_suffix(".ipynb").name for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
  assert sources == sorted(EXPECTED), "every notebook needs its .py source, and vice versa"


def test_kernel_runs_this_python():
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  spec = KernelSpecManager().get_kernel_spec("python3")
  km = KernelManager(kernel_name="python3")
  cmd = km.format_kernel_cmd()
  assert spec.language == "python"
  assert cmd[0] == sys.executable, (cmd, sys.executable)


def _outputs(nb):
  for cell in nb.cells:
    if cell.cell_type == "code":
      yield from cell.outputs


# 02 (Conv4 on the real arrays) and 04 (a grid of sinusoid runs) take a minute or more each:
# -m slow. Their parts run by default elsewhere (test_omniglot_train, test_robustness_grid).
DEFAULT_RUN = {"01_quickstart_sinusoid.ipynb", "03_hypergradient_explained.ipynb"}


@pytest.mark.parametrize("name", slow_except(sorted(EXPECTED), DEFAULT_RUN))
def test_notebook_runs(name, monkeypatch, tmp_path):
  if name == "02_omniglot.ipynb":
    from amaml.data import find_omniglot_dir

    found = find_omniglot_dir()
    if found is None or not (found / "images_background.npz").is_file():
      pytest.skip("no Omniglot arrays (../shared/data/omniglot or $AMAML_OMNIGLOT_DIR)")
  monkeypatch.setenv("AMAML_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  first = nb.cells[1] if nb.cells[0].cell_type == "markdown" else nb.cells[0]
  assert 'FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"' in first.source
  for cell in nb.cells:  # run from scratch, not from the committed outputs
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = list(_outputs(nb))
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  images = [
    o
    for o in outputs
    if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
  ]
  min_images, text = EXPECTED[name]
  assert len(images) >= min_images, f"{name}: {len(images)} figures, expected {min_images}"
  all_text = json.dumps([o.get("text", "") for o in outputs if o.output_type == "stream"])
  assert text in all_text, f"{name}: no output contains {text!r}"


def test_design_doc_example_runs(capsys):
  """docs/design.md's "your own model, loss and data" example runs (fewer steps)."""
  import re

  design = NOTEBOOKS.parent / "docs" / "design.md"
  code = re.findall(r"```python\n(.*?)```", design.read_text(), re.S)[0]
  code = code.replace("range(100)", "range(3)").replace("10**6), 200)", "10**6), 20)")
  exec(compile(code, str(design), "exec"), {})
  mean, ci = eval(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 <= mean <= 1.0 and ci >= 0.0


def _cells(nb):
  return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_matches_its_jupytext_source(name):
  """The .ipynb holds exactly the cells of its paired .py source, so the two cannot drift."""
  jupytext = pytest.importorskip("jupytext")

  source = NOTEBOOKS / name.replace(".ipynb", ".py")
  text = source.read_text()
  # the header names the format, so that `jupytext --to ipynb` reads it as we do
  assert jupytext.formats.guess_format(text, ".py")[0] == "percent", (
    f"{source.name}: no percent header"
  )
  from_source = jupytext.reads(text, fmt="py")
  assert from_source.metadata.get("kernelspec", {}).get("name") == "python3", source.name
  committed = nbformat.read(NOTEBOOKS / name, as_version=4)
  assert _cells(committed) == _cells(from_source), (
    f"{name} differs from {source.name}: edit the .py, then run python notebooks/_build.py"
  )


def test_build_script_writes_the_source_cells():
  """notebooks/_build.py builds from the .py sources (what the committed .ipynb must equal)."""
  pytest.importorskip("jupytext")
  import importlib.util

  spec = importlib.util.spec_from_file_location("_nb_build", NOTEBOOKS / "_build.py")
  build = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(build)
  assert sorted(p.with_suffix(".ipynb").name for p in build.sources()) == sorted(EXPECTED)
  for source in build.sources():
    nb = build.build(source)
    nbformat.validate(nb)
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert _cells(nb) == _cells(committed), source.name
    assert nb.metadata["kernelspec"]["name"] == "python3"
