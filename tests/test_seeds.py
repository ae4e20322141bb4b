"""Several seeds in one program (``--seeds N``, :mod:`amaml.seeds`): N vmapped seeds equal N
separate runs, a killed multi-seed run resumes bitwise, the summary over seeds is right."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from amaml import cli, seeds, train
from amaml.experiment import build
from amaml.configs import get_config
from amaml.results import load_run

REPO = Path(__file__).resolve().parents[1]
SHARED = ("step", "steps_per_s")  # the keys of a line that belong to no one seed


def _lines(run: Path) -> list[dict]:
  return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_seeds_equal_separate_runs(cfg, tmp_path: Path, n: int = 3) -> None:
  """``cfg`` with ``seeds`` n equals the n runs of seeds ``cfg.seed + k``: every logged
  value and every final number to 1e-6; each line's mean is the mean of its seeds."""
  _, multi = train.train(dataclasses.replace(cfg, seeds=n), tmp_path / "multi", progress=False)
  lines = _lines(tmp_path / "multi")
  for k in range(n):
    one = dataclasses.replace(cfg, seed=cfg.seed + k)
    _, alone = train.train(one, tmp_path / f"seed{k}", progress=False)
    alone_lines = _lines(tmp_path / f"seed{k}")
    assert len(alone_lines) == len(lines)
    for got, want in zip(lines, alone_lines):
      assert got["step"] == want["step"]
      names = [name for name in want if name not in SHARED]
      assert set(names) <= {name.split("/", 1)[1] for name in got if name.startswith("seed0/")}
      for name in names:
        np.testing.assert_allclose(got[f"seed{k}/{name}"], want[name], rtol=1e-6, atol=1e-6)
    per = multi["per_seed"][k]
    assert per["seed"] == cfg.seed + k
    np.testing.assert_allclose(per["final_alpha"], alone["final_alpha"], rtol=1e-6)
    for name, v in alone["test"].items():
      if isinstance(v, str):
        assert per["test"][name] == v
      else:
        np.testing.assert_allclose(per["test"][name], v, rtol=1e-6, atol=1e-6, err_msg=name)
  for line in lines:
    for name in ("loss", "alpha"):
      mean = np.mean([line[f"seed{k}/{name}"] for k in range(n)])
      np.testing.assert_allclose(line[name], mean, rtol=1e-12)
  assert multi["test"]["seeds"] == n


def test_vmapped_seeds_equal_separate_runs_on_sinusoid(tiny_config, tmp_path):
  cfg = tiny_config(iterations=20, checkpoint_every=0, val_every=10, val_tasks=10, seed=5)
  _assert_seeds_equal_separate_runs(cfg, tmp_path)


@pytest.mark.slow  # about 2 minutes; the sinusoid test above runs by default
def test_vmapped_seeds_equal_separate_runs_on_fake_omniglot(small_omniglot, tmp_path):
  """One alpha: with one per tensor the normalized rule moves each by about the sign of its
  hypergradient, so a small one's rounding under a vmapped convolution moves that alpha by
  a whole step (per tensor, the values here agree to 1.3e-6, not 1e-6)."""
  cfg = get_config(
    "omniglot-5w1s",
    alpha_granularity="scalar",
    data_dir=small_omniglot,
    hidden=8,
    meta_batch=2,
    queries=3,
    iterations=10,
    log_every=5,
    checkpoint_every=0,
    val_every=5,
    val_tasks=4,
    test_adaptation="fixed",
    eval_tasks=4,
    eval_batch=4,
    eval_inner_steps=2,
  )
  _assert_seeds_equal_separate_runs(cfg, tmp_path, n=2)


def _cmd(out: Path, resume: bool = False) -> list[str]:
  flags = dict(iterations=200, log_every=10, checkpoint_every=10, val_every=0, seeds=3)
  flags.update(hidden=8, meta_batch=2, eval_tasks=10, eval_batch=10, seed=2)
  cmd = [sys.executable, "-m", "amaml", "train", "--config", "sinusoid", "--no_progress"]
  cmd += [f"--{k}={v}" for k, v in flags.items()] + ["--out", str(out)]
  return cmd + (["--resume"] if resume else [])


# a minute of subprocesses; by default test_keep_best resumes a --seeds 2 run and
# test_reliability resumes a SIGKILLed run, each bitwise
@pytest.mark.slow
def test_killed_multi_seed_run_resumes_bitwise(tmp_path):
  """SIGKILL after the first checkpoints, ``--resume``: the final state of every seed, and
  every logged value but the speed, equal an uninterrupted run's."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  run = lambda out, resume=False: subprocess.run(
    _cmd(out, resume), cwd=REPO, env=env, check=True, capture_output=True
  )
  run(tmp_path / "full")
  victim = subprocess.Popen(_cmd(tmp_path / "victim"), cwd=REPO, env=env)
  lines = tmp_path / "victim" / "metrics.jsonl"
  t_end = time.monotonic() + 120
  while victim.poll() is None and not (lines.exists() and len(lines.read_text()) > 0):
    assert time.monotonic() < t_end, "the multi-seed run made no progress"
    time.sleep(0.005)
  time.sleep(0.3)
  assert victim.poll() is None, "the run ended before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert len(_lines(tmp_path / "victim")) < 20  # killed before its end
  run(tmp_path / "victim", resume=True)
  _, full = load_run(tmp_path / "full")
  _, resumed = load_run(tmp_path / "victim")
  assert np.shape(full.step) == (3,)
  chex.assert_trees_all_equal(full, resumed)
  strip = lambda recs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in recs]
  assert strip(_lines(tmp_path / "full")) == strip(_lines(tmp_path / "victim"))
  got = json.loads((tmp_path / "victim" / "results.json").read_text())
  want = json.loads((tmp_path / "full" / "results.json").read_text())
  assert got["per_seed"] == want["per_seed"] and got["test"] == want["test"]


def test_mean_and_spread_over_seeds_are_the_hand_computed_values():
  summaries = [
    dict(split="test", tasks=10, inner_steps=3, alpha_scale=1.0, accuracy=a, accuracy_ci95=c)
    for a, c in ((0.5, 0.1), (0.7, 0.2), (0.9, 0.3))
  ]
  summaries[2]["inner_steps"] = 5
  out = seeds.spread(summaries)
  assert out["seeds"] == 3 and out["tasks"] == 10 and out["alpha_scale"] == 1.0
  assert "inner_steps" not in out  # the seeds chose differently
  assert out["accuracy"] == pytest.approx(0.7)
  # sqrt(((0.5 - 0.7)^2 + 0 + (0.9 - 0.7)^2) / (3 - 1)) = sqrt(0.04) = 0.2
  assert out["accuracy_seed_std"] == pytest.approx(0.2)
  assert out["accuracy_ci95"] == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3) / 3
  line = seeds.line([{"loss": 1.0, "nonfinite_steps": 0}, {"loss": 4.0, "nonfinite_steps": 2}])
  assert line == {
    "loss": 2.5,
    "nonfinite_steps": 1.0,
    "seed0/loss": 1.0,
    "seed0/nonfinite_steps": 0,
    "seed1/loss": 4.0,
    "seed1/nonfinite_steps": 2,
  }


def test_one_seed_writes_what_it_always_did(tiny_config, tmp_path):
  """``--seeds 1`` (the default): no per-seed keys, no per_seed results."""
  _, results = train.train(tiny_config(iterations=10), tmp_path / "r", progress=False)
  assert not any("/" in k for k in _lines(tmp_path / "r")[0])
  assert "per_seed" not in results and "seeds" not in results["test"]


def test_evaluate_reports_each_seed_and_the_spread(tiny_config, tmp_path, capsys):
  cfg = tiny_config(iterations=10, checkpoint_every=10, seeds=2, seed=3)
  train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  assert cli.main(["evaluate", "--run", str(tmp_path / "r"), "--eval_tasks", "10"]) == 0
  out = capsys.readouterr().out
  assert "seed 3:" in out and "seed 4:" in out and "mean over 2 seeds" in out
  test = json.loads(out.strip().splitlines()[-1])
  assert test["seeds"] == 2 and "loss_seed_std" in test and "loss_ci95" in test


def test_unsupported_combinations_are_one_line(tiny_config):
  with pytest.raises(ValueError, match="--seeds 2 with --devices") as e:
    tiny_config(seeds=2, devices=2).validate()
  assert "\n" not in str(e.value)


def test_vmapped_seeds_search_alpha_as_separate_runs(tiny_config, tmp_path):
  """``--alpha_search`` with ``--seeds``: each seed searches on its own first meta-batch, as
  its one-seed run does (alpha0 = 1 overshoots the sinusoid MLP: the search moves it)."""
  cfg = tiny_config(iterations=6, checkpoint_every=0, alpha=1.0, alpha_search=True, seed=2)
  _assert_seeds_equal_separate_runs(cfg, tmp_path, n=2)
  exp = build(dataclasses.replace(cfg, seeds=2))
  search = train.alpha_search(exp, vmapped=True)
  state = search(seeds.init_state(exp), exp.data["train"], jnp.array([2, 3]))
  assert np.all(np.asarray(jax.tree.leaves(state.alpha)[0]) < 1.0)


def test_init_state_loads_the_data_once_and_equals_the_builds_of_each_seed(
  small_omniglot, monkeypatch
):
  """Seed k's initial weights are those that a build of seed ``seed + k`` makes, bitwise,
  from the model's initializer alone: the data set is loaded once for every seed. A task
  setup without ``init_params`` builds each other seed (and so loads its data again)."""
  import amaml.data

  cfg = get_config("omniglot-5w1s", data_dir=small_omniglot, hidden=8, seeds=3, seed=4)
  built = [build(seeds.seed_config(cfg, k)).params for k in range(3)]
  loads, load = [], amaml.data.load_omniglot
  monkeypatch.setattr(
    amaml.data, "load_omniglot", lambda *a, **kw: loads.append(1) or load(*a, **kw)
  )
  exp = build(cfg)
  state = seeds.init_state(exp)
  assert len(loads) == 1
  for k in range(3):
    chex.assert_trees_all_equal(seeds.seed_state(state, k).params, built[k])
  assert not np.array_equal(state.params["head"]["kernel"][0], state.params["head"]["kernel"][1])
  fallback = seeds.init_state(exp._replace(init_params=None))
  assert len(loads) == 3
  chex.assert_trees_all_equal(fallback, state)


def test_memory_of_the_seeds_counted_by_hand(tiny_config, capsys):
  """The MLP 1-4-4-1 has p = (1 + 1) * 4 + (4 + 1) * 4 + (4 + 1) * 1 = 33 weights. maml's
  state (Adam wrapped in the hypergradient optimizer) holds 4 copies of them (the weights,
  Adam's two moments, the last direction) and 13 scalars (alpha; its rule's Adam: count and
  two moments; beta and its hypergradient; beta's rule's Adam, 3; Adam's count; the
  hypergradient's count; step; the non-finite streak): 4 bytes each. The tasks of a step:
  4 arrays of meta_batch x 10 points x 1 float."""
  cfg = tiny_config(method="maml", hidden=4, meta_batch=4, seeds=3)
  exp = build(cfg)
  p = 2 * 4 + 5 * 4 + 5 * 1
  assert seeds.memory_needs(exp, None) == (4 * (4 * p + 13), 4 * 4 * 10 * 4)
  text = seeds.check_memory(exp, None)
  assert text.startswith("--seeds 3: training state 3 x 580 B = 1.74 kB, ")
  assert "tasks of a meta step 3 x 640 B = 1.92 kB; activations grow" in text
  assert capsys.readouterr().err == f"amaml: {text}\n"


def test_seeds_over_the_device_memory_stop_before_compiling(tiny_config, tmp_path, monkeypatch):
  """A device that reports a memory limit below the stacked state: one line, before the
  state is made or anything compiles; above it, the line names the limit."""
  never = lambda *a, **kw: pytest.fail("compiled or built a state past the memory check")
  monkeypatch.setattr(train, "make_train_chunk", never)
  monkeypatch.setattr(seeds, "init_state", never)
  monkeypatch.setattr(seeds, "device_limit", lambda device=None: 1000)
  cfg = tiny_config(method="maml", hidden=4, seeds=3)
  with pytest.raises(ValueError, match=r"3 x 580 B = 1.74 kB, more than .* of 1 kB; lower") as e:
    train.train(cfg, tmp_path / "r", progress=False)
  assert "\n" not in str(e.value)
  monkeypatch.setattr(seeds, "device_limit", lambda device=None: 2_000)
  assert seeds.check_memory(build(cfg), None, quiet=True).endswith("(device memory limit 2 kB)")
