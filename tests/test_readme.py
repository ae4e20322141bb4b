"""The code of the README and of the documentation pages runs as written (with fewer
iterations), and their commands parse."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
METHODS = ROOT / "docs" / "methods.md"
# the pages a newcomer reads: the README and the documentation's own pages (not the API's)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path = README):
  return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _block(marker: str, page: Path = README) -> str:
  """The one Python block of ``page`` that contains ``marker``."""
  (code,) = [b for b in _blocks(page) if marker in b]
  return code


def test_readme_training_loop_runs(capsys):
  code = _block("range(20000)").replace("range(20000)", "range(30)").replace("600)", "20)")
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("0 ") and "(" in out[-1]


def test_docs_optax_snippet_runs():
  import jax.numpy as jnp
  import optax
  import amaml

  code = _block("amaml.hypergradient(", METHODS)
  params = jnp.ones(3)
  env = {"optax": optax, "amaml": amaml}
  exec(
    compile(code.replace("amaml.current_learning_rate(opt_state)", "pass"), str(METHODS), "exec"),
    env,
  )
  state = env["opt"].init(params)
  assert abs(float(amaml.current_learning_rate(state)) - 0.01) < 1e-9


def test_commands_parse():
  """Every `amaml ...` command in the shell blocks of the README and of the documentation's
  pages is accepted by the CLI parser."""
  import shlex
  from amaml import cli

  commands = []
  for page in PAGES:
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", page.read_text(), re.S))
    commands += [
      (page.name, line.split("amaml ", 1)[1].split("#")[0])
      for line in shell.splitlines()
      if "bin/amaml " in line
    ]
  assert sum(name == "README.md" for name, _ in commands) >= 5
  assert len(commands) >= 20
  for name, c in commands:
    args = cli._parser().parse_args(shlex.split(c))
    assert args.command in ("train", "evaluate", "plot", "reproduce", "download"), (name, c)


def test_docs_methods_snippet_runs(capsys):
  code = _block("learners = {", METHODS).replace("range(100)", "range(3)")
  exec(compile(code, str(METHODS), "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 9 and all(float(v.rsplit(" ", 1)[1]) > 0 for v in out)


def test_docs_protonet_snippet_runs(capsys, monkeypatch, tmp_path):
  from conftest import write_fake_omniglot
  import amaml.data.omniglot as om

  monkeypatch.setattr(om, "MAML_NUM_TRAIN", 12)  # the fake set's 20 characters: 12 / 4 / 4
  monkeypatch.setattr(om, "MAML_NUM_VAL", 4)
  monkeypatch.setenv("AMAML_OMNIGLOT_DIR", str(write_fake_omniglot(tmp_path / "omni", 12, 8)))
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "cache"))
  code = _block("amaml.protonet(", METHODS)
  code = code.replace("range(100)", "range(2)").replace(", 32))", ", 4))")
  exec(compile(code, str(METHODS), "exec"), {})
  assert 0.0 <= float(capsys.readouterr().out.split()[-1]) <= 1.0


def test_docs_nnx_snippet_runs(capsys):
  from flax import nnx

  env = {}
  code = _block("from flax import nnx", METHODS).replace("range(2000)", "range(20)")
  exec(compile(code, str(METHODS), "exec"), env)
  assert isinstance(env["state"].params, nnx.State) and "head" in env["state"].params
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 2 and all(0 < float(v.rsplit(" ", 1)[1]) < 100 for v in out)


def test_docs_parts_snippet_runs(capsys):
  code = _block("safeguards.backtrack(", METHODS).replace("range(100)", "range(5)")
  env = {}
  exec(compile(code, str(METHODS), "exec"), env)
  mse, alpha = (float(v.split()[-1]) for v in capsys.readouterr().out.strip().split(","))
  assert 0 < mse < 100 and 0 < alpha
  assert env["learner"].phases == () and int(env["state"].step) == 5


def test_readme_links_resolve():
  """The README's links to files of the repository point at files that exist."""
  text = README.read_text()
  for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
    if "://" not in target:
      assert (ROOT / target).exists(), target
