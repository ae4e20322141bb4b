"""The README's code runs as written (with fewer iterations)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _block(marker: str) -> str:
  """The one Python block of the README that contains ``marker``."""
  (code,) = [b for b in _blocks() if marker in b]
  return code


def test_readme_training_loop_runs(capsys):
  code = _block("range(20000)").replace("range(20000)", "range(30)").replace("600)", "20)")
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("0 ") and "(" in out[-1]


def test_readme_optax_snippet_runs():
  import jax.numpy as jnp
  import optax
  import amaml

  code = _block("amaml.hypergradient(")
  params = jnp.ones(3)
  env = {"optax": optax, "amaml": amaml}
  exec(
    compile(code.replace("amaml.current_learning_rate(opt_state)", "pass"), "README.md", "exec"),
    env,
  )
  state = env["opt"].init(params)
  assert abs(float(amaml.current_learning_rate(state)) - 0.01) < 1e-9


def test_readme_commands_parse():
  """Every `amaml ...` command in the README's shell blocks is accepted by the CLI parser."""
  import shlex
  from amaml import cli

  shell = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S))
  commands = [
    line.split("amaml ", 1)[1].split("#")[0] for line in shell.splitlines() if "bin/amaml " in line
  ]
  assert len(commands) >= 5
  for c in commands:
    args = cli._parser().parse_args(shlex.split(c))
    assert args.command in ("train", "evaluate", "plot", "reproduce")


def test_readme_methods_snippet_runs(capsys):
  code = _block("learners = {").replace("range(100)", "range(3)")
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 9 and all(float(v.rsplit(" ", 1)[1]) > 0 for v in out)


def test_readme_protonet_snippet_runs(capsys, monkeypatch, tmp_path):
  from conftest import write_fake_omniglot
  import amaml.data.omniglot as om

  monkeypatch.setattr(om, "MAML_NUM_TRAIN", 12)  # the fake set's 20 characters: 12 / 4 / 4
  monkeypatch.setattr(om, "MAML_NUM_VAL", 4)
  monkeypatch.setenv("AMAML_OMNIGLOT_DIR", str(write_fake_omniglot(tmp_path / "omni", 12, 8)))
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "cache"))
  code = _block("amaml.protonet(").replace("range(100)", "range(2)").replace(", 32))", ", 4))")
  exec(compile(code, "README.md", "exec"), {})
  assert 0.0 <= float(capsys.readouterr().out.split()[-1]) <= 1.0


def test_readme_nnx_snippet_runs(capsys):
  from flax import nnx

  env = {}
  exec(
    compile(
      _block("from flax import nnx").replace("range(2000)", "range(20)"), "README.md", "exec"
    ),
    env,
  )
  assert isinstance(env["state"].params, nnx.State) and "head" in env["state"].params
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 2 and all(0 < float(v.rsplit(" ", 1)[1]) < 100 for v in out)


def test_readme_parts_snippet_runs(capsys):
  code = _block("safeguards.backtrack(").replace("range(100)", "range(5)")
  env = {}
  exec(compile(code, "README.md", "exec"), env)
  mse, alpha = (float(v.split()[-1]) for v in capsys.readouterr().out.strip().split(","))
  assert 0 < mse < 100 and 0 < alpha
  assert env["learner"].phases == () and int(env["state"].step) == 5
