"""Time to a trained model: amaml and the torch.func MAML peer trained side by side on
Omniglot 5-way 1-shot, each evaluated on the same 600 meta-test tasks every few minutes.

    python benchmarks/time_to_accuracy.py                       # 30 minutes each, 3-minute rounds
    python benchmarks/time_to_accuracy.py --minutes 2 --round-minutes 1 --eval-tasks 100  # a look

Implementations (``--impls``), all from the same numpy initial weights
(``shared/peers/common.init_params``), on the same training tasks (meta step ``i`` samples
its 32 tasks from amaml's MAML-protocol training split with ``(seed, i)``, 5 queries per
class), second order, outer Adam at 1e-3:
  torchfunc     the torch.func peer's meta-step (``shared/peers/torchfunc_maml.py``, per-task
                loop, ``autograd.grad(create_graph=True)``), MAML at alpha = 0.4; this file
                writes its training loop and test-time adaptation.
  amaml-maml    ``amaml.maml`` at alpha = 0.4: the same algorithm, amaml's jitted step.
  amaml         amaml's default (``amaml.alpha_maml``: one alpha per parameter tensor, each
                by its own hypergradient, Adam at 1e-3 outside) from the untuned alpha0 = 4,
                replaced first by the alpha0 search's choice (``--alpha_search``; the search
                runs on the training clock, its compilation off it).
  amaml-dadapt  the same with D-Adaptation's AdamW outside and no search.

The implementations take turns in rounds of ``--round-minutes`` of training each (so load
from other users of the machine hits them alike), all in this one process. After each round
each is evaluated, off the clock, on the same fixed meta-test tasks with MAML's protocol:
10 inner SGD steps at its alpha (amaml's default: at its per-tensor alphas; the records
give their mean), batch statistics per task. The training clock counts the
meta steps only (for the peer not its host-side task sampling either).

Writes ``benchmarks/results/time-to-accuracy.jsonl`` (one line per evaluation), draws
``docs/images/time-to-accuracy.png`` and prints the table of BENCHMARKS.md: time to 95% and
97% meta-test accuracy (the first evaluation whose mean reaches the target; in brackets the
first whose 95% interval's upper and lower ends do), and the accuracy at 10 and 30 minutes
(``--report-minutes``). ``--render`` redraws both from ``--out``, also of a run stopped early.
Needs PyTorch (``pip install torch``) and the peers' folder (``$AMAML_PEERS_DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _peers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "time-to-accuracy.jsonl"
IMPLS = ("torchfunc", "amaml-maml", "amaml", "amaml-dadapt")
TARGETS = (0.95, 0.97)
LABELS = {
  "torchfunc": "torch.func peer: MAML at its tuned alpha = 0.4",
  "amaml-maml": "amaml.maml at alpha = 0.4",
  "amaml": "amaml default from the untuned alpha0 = 4",
  "amaml-dadapt": "amaml with D-Adaptation outside, from alpha0 = 4",
}
# what throughput.py gives every worker: XLA:CPU's per-call buffers then reuse freed memory
MALLOC_ENV = {
  "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
  "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
  "MALLOC_TOP_PAD_": str(1 << 30),
}


AMAML_SETTINGS = {
  "amaml-maml": {"method": "maml", "alpha": 0.4},
  "amaml": {"alpha": 4.0},
  "amaml-dadapt": dict(alpha=4.0, outer_optimizer="dadapt_adamw", alpha_search=False),
}


class AmamlImpl:
  """amaml's training chunks (``amaml.train.make_train_chunk``) from the peers' weights."""

  def __init__(self, exp, params):
    import jax
    import jax.numpy as jnp
    from amaml import train

    self.exp, self.jnp = exp, jnp
    self.state = exp.learner.init(jax.tree.map(jnp.copy, params))  # the chunks donate it
    self.chunk = train.make_train_chunk(exp, 1000)
    self.step_s, self.steps, self.search_s = None, 0, 0.0
    self.images = exp.data["train"]
    if exp.config.resolved_alpha_search:  # compiled off the clock, run on it (first round)
      seed = exp.config.seed
      search = train.alpha_search(exp).lower(self.state, self.images, seed).compile()
      t0 = time.perf_counter()
      self.state = jax.block_until_ready(search(self.state, self.images, seed))
      self.search_s = time.perf_counter() - t0
    jax.block_until_ready(
      self.chunk(jax.tree.map(jnp.copy, self.state), self.images, jnp.int32(0), jnp.int32(1))
    )  # compile off the clock

  def train_for(self, seconds: float) -> float:
    import numpy as np

    used, self.search_s = self.search_s, 0.0
    while used < seconds:
      n = 1 if self.step_s is None else max(1, min(1000, int((seconds - used) / self.step_s)))
      t0 = time.perf_counter()
      self.state, ms = self.chunk(self.state, self.images, np.int32(self.steps), np.int32(n))
      np.asarray(ms["loss"][0])  # waits for the chunk
      dt = time.perf_counter() - t0
      self.step_s = dt / n
      self.steps += n
      used += dt
    return used

  def accuracies(self, batches, inner_steps: int):
    import numpy as np

    return np.concatenate(
      [
        np.asarray(
          self.exp.learner.evaluate(
            self.state.params, self.state.alpha, b, inner_steps=inner_steps
          )["accuracy"]
        )
        for b in batches
      ]
    )

  @property
  def alpha(self) -> float:
    from amaml.meta import tree_mean

    return float(tree_mean(self.state.alpha))


class TorchImpl:
  """The torch.func peer's meta-step, with a training loop on amaml's tasks."""

  def __init__(self, exp, cfg_peer, seed: int, alpha: float):
    import torch
    import torch_common as tc
    import torchfunc_maml
    from amaml.train import run_keys

    self.torch, self.exp, self.alpha = torch, exp, alpha
    torch.set_num_threads(os.cpu_count() or 2)
    self.model = tc.make_model(cfg_peer["ways"], seed)
    self.step, _ = torchfunc_maml.build_step(self.model, {**cfg_peer, "alpha": alpha}, "loop")
    self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg_peer["outer_lr"])
    self.train_key = run_keys(exp.config).train
    self.steps = 0

  def _to_torch(self, batch):
    import numpy as np

    t = self.torch
    nchw = lambda x: t.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3)))
    return (
      nchw(batch.support_x),
      t.from_numpy(np.asarray(batch.support_y).astype(np.int64)),
      nchw(batch.query_x),
      t.from_numpy(np.asarray(batch.query_y).astype(np.int64)),
    )

  def train_for(self, seconds: float) -> float:
    import jax

    used = 0.0
    while used < seconds:
      key = jax.random.fold_in(self.train_key, self.steps)
      batch = self._to_torch(
        self.exp.sample(key, self.exp.data["train"], self.exp.config.meta_batch)
      )  # off the clock
      t0 = time.perf_counter()
      self.step(batch)
      self.opt.step()
      used += time.perf_counter() - t0
      self.steps += 1
    return used

  def accuracies(self, batches, inner_steps: int):
    import numpy as np
    import torch.nn.functional as F
    from torch.func import functional_call

    t = self.torch
    params = {n: p.detach() for n, p in self.model.named_parameters()}
    out = []
    for b in batches:
      xs, ys, xq, yq = self._to_torch(b)
      for i in range(xs.shape[0]):
        fast = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        for _ in range(inner_steps):  # first order at test time, as amaml's evaluate
          loss = F.cross_entropy(functional_call(self.model, fast, (xs[i],)), ys[i])
          g = t.autograd.grad(loss, list(fast.values()))
          fast = {
            n: (w - self.alpha * gi).detach().requires_grad_(True)
            for (n, w), gi in zip(fast.items(), g)
          }
        with t.no_grad():
          pred = functional_call(self.model, fast, (xq[i],)).argmax(-1)
        out.append(float((pred == yq[i]).float().mean()))
    return np.asarray(out)


def build(args):
  """The implementations, from the same initial weights and the same task sampler."""
  from amaml import train
  from amaml.configs import get_config

  common = _peers.peers_common()
  torch_init = common.init_params(args.seed, 5)
  params = _peers.conv4_params_from_torch(torch_init)
  base = dict(eval_batch=50, eval_inner_steps=10, seed=args.seed, track_pre_adaptation=False)
  impls = {}
  for name in args.impls:
    if name == "torchfunc":
      exp = train.build(get_config("omniglot-5w1s", method="maml", alpha=0.4, **base))
      impls[name] = TorchImpl(exp, common.CONFIGS["omniglot-5w1s"], args.seed, 0.4)
    else:
      cfg = get_config("omniglot-5w1s", **base, **AMAML_SETTINGS[name])
      exp = train.build(cfg)
      impls[name] = AmamlImpl(exp, params)
  ref = next(iter(impls.values())).exp
  batches = list(train.eval_batches(ref, "test", args.eval_tasks))
  return impls, batches


def crossing(points, target):
  """(minutes at which the mean reaches target, [upper CI end reaches, lower end reaches]).
  An accuracy is a count of right queries over all of them, averaged in float32: 97% of
  3,000 queries can arrive as 0.96999999, so a target counts as reached within 1e-6."""
  first = lambda key: next((p["train_minutes"] for p in points if key(p) >= target - 1e-6), None)
  return (
    first(lambda p: p["accuracy"]),
    first(lambda p: p["accuracy"] + p["ci95"]),
    first(lambda p: p["accuracy"] - p["ci95"]),
  )


def at_minutes(points, minutes):
  """The last evaluation at ``minutes`` of training or before. A round ends with the meta
  step (or chunk) that crosses its budget, a few seconds late: up to 2% over counts."""
  before = [p for p in points if p["train_minutes"] <= 1.02 * minutes]
  return before[-1] if before else None


def table(records, minutes=(10, 30)) -> str:
  """The markdown table: per implementation, its steps and s/step, the minutes to each of
  :data:`TARGETS`, and the accuracy at each of ``minutes`` of training."""
  impls = list(dict.fromkeys(r["impl"] for r in records))
  fmt = lambda v: "not reached" if v is None else f"{v:.1f}"
  lines = [
    "| implementation | meta steps | s / step | "
    + " | ".join(f"minutes to {100 * t:.0f}% [CI]" for t in TARGETS)
    + " | "
    + " | ".join(f"accuracy at {m:g} min" for m in minutes)
    + " |",
    "| --- " * (3 + len(TARGETS) + len(minutes)) + "|",
  ]
  for impl in impls:
    pts = [r for r in records if r["impl"] == impl]
    last = pts[-1]
    cells = []
    for t in TARGETS:
      mean, hi, lo = crossing(pts, t)
      cells.append(f"{fmt(mean)} [{fmt(hi)}, {fmt(lo)}]")
    accs = []
    for m in minutes:  # blank where the run stopped short of m minutes
      p = at_minutes(pts, m)
      accs.append(
        ""
        if p is None or last["train_minutes"] < 0.98 * m
        else f"{100 * p['accuracy']:.2f}% ± {100 * p['ci95']:.2f}%"
      )
    lines.append(
      f"| {LABELS.get(impl, impl)} | {last['steps']:,} | "
      f"{60 * last['train_minutes'] / last['steps']:.2f} | " + " | ".join(cells + accs) + " |"
    )
  return "\n".join(lines)


def plot(records, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for impl in dict.fromkeys(r["impl"] for r in records):
    pts = [r for r in records if r["impl"] == impl]
    x = [p["train_minutes"] for p in pts]
    y = [100 * p["accuracy"] for p in pts]
    ci = [100 * p["ci95"] for p in pts]
    (line,) = ax.plot(x, y, "o-", label=LABELS.get(impl, impl))
    ax.fill_between(
      x,
      [a - c for a, c in zip(y, ci)],
      [a + c for a, c in zip(y, ci)],
      color=line.get_color(),
      alpha=0.2,
    )
  for t in TARGETS:
    ax.axhline(100 * t, color="grey", lw=0.8, ls=":")
  ax.set(
    xlabel="training wall time on the 2-core CPU (minutes)",
    ylim=(80, 100),
    ylabel="meta-test accuracy, 600 tasks (%)",
    title="Omniglot 5-way 1-shot: accuracy against training time",
  )
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--minutes", type=float, default=30.0, help="training minutes per implementation")
  ap.add_argument(
    "--round-minutes", type=float, default=3.0, help="training minutes between evaluations"
  )
  ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
  ap.add_argument("--eval-tasks", type=int, default=600)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=str(RESULTS))
  ap.add_argument("--png", default=str(ROOT / "docs" / "images" / "time-to-accuracy.png"))
  ap.add_argument(
    "--render", action="store_true", help="only print the table and draw the PNG from --out"
  )
  ap.add_argument(
    "--report-minutes",
    type=float,
    nargs="+",
    default=[10, 30],
    help="training minutes at which the table gives each accuracy",
  )
  args = ap.parse_args(argv)
  if args.render:
    records = [json.loads(l) for l in Path(args.out).read_text().splitlines()]
    print(table(records, args.report_minutes))
    plot(records, Path(args.png))
    return
  if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # restart with the allocator set
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

  from amaml.env import versions
  from amaml.stats import mean_confidence_interval

  impls, batches = build(args)
  rounds = math.ceil(args.minutes / args.round_minutes)
  clock = {name: 0.0 for name in impls}
  records = []
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("")
  for r in range(rounds):
    for name, impl in impls.items():
      budget = min(args.round_minutes, args.minutes - clock[name] / 60) * 60
      clock[name] += impl.train_for(budget)
      acc = impl.accuracies(batches, inner_steps=10)[: args.eval_tasks]
      mean, ci = mean_confidence_interval(acc)
      rec = {
        "impl": name,
        "round": r,
        "train_minutes": clock[name] / 60,
        "steps": impl.steps,
        "accuracy": float(mean),
        "ci95": float(ci),
        "tasks": int(acc.size),
        "alpha": float(impl.alpha),
        "versions": versions(),
      }
      if name == "torchfunc":
        rec["versions"]["torch"] = impl.torch.__version__
      records.append(rec)
      print(json.dumps(rec), flush=True)
      with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
  print(table(records, args.report_minutes))
  plot(records, Path(args.png))


if __name__ == "__main__":
  main()
