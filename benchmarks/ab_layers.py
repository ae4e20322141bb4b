"""Two settings of ``amaml.models.layers`` or ``amaml.inner_loop``, or two methods, timed
in one process.

    python benchmarks/ab_layers.py --set TAPS_CHANNELS=0 --config omniglot-5w1s --rounds 8
    python benchmarks/ab_layers.py --set ONE_AT_A_TIME_ELEMENTS=1000000000 --rounds 8
    python benchmarks/ab_layers.py --impl alpha --impl-b alpha-no-backtrack --rounds 8

Builds ``throughput.py``'s Conv4 step (``amaml-<--impl>``: ``maml``, ``alpha`` or
``alpha-no-backtrack``, on the peers' episodes and weights) twice: once as the library is
(``base``), once (``set``) with each ``NAME=VALUE`` of ``--set`` assigned to
``amaml.models.layers`` or ``amaml.inner_loop`` (the first that has ``NAME``) while it
traces, as ``amaml-<--impl-b>`` where given. Then it alternates the two compiled steps,
``--steps`` steps each per round, the order swapped every round, and prints each round's
pair and the median ratio (set over base). Both steps share
the process, its allocator and the minute they run in, so pairs compare on a machine whose
speed drifts by 20% between minutes, where ``ab_step.py``'s separate processes do not. Run
it with ``throughput.py``'s allocator settings (``MALLOC_*``), as ``throughput.py`` runs its
workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import throughput  # noqa: E402


def parse_settings(pairs: list[str], *modules) -> dict:
  """``["NAME=VALUE", ...]`` -> ``{NAME: value}``, each value of the type the current one
  has in the first of ``modules`` that has ``NAME`` (a flag: ``true`` or ``false``); an
  unknown name or a bad value is a one-line error."""
  settings = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    module = next((m for m in modules if hasattr(m, name)), None)
    if not sep or module is None:
      known = sorted(k for m in modules for k in vars(m) if k.isupper())
      raise SystemExit(f"--set {pair!r}: expected NAME=VALUE with NAME one of {known}")
    kind = type(getattr(module, name))
    bad = SystemExit(f"--set {pair!r}: {value!r} is not a {kind.__name__}")
    if kind is bool:
      if value.lower() not in ("true", "false"):
        raise bad
      settings[name] = value.lower() == "true"
      continue
    try:
      settings[name] = kind(value)
    except ValueError:
      raise bad from None
  return settings


def _modules():
  from amaml import inner_loop
  from amaml.models import layers

  return layers, inner_loop


def build(args, settings: dict):
  """``throughput.build`` with ``settings`` assigned to ``amaml.models.layers`` or
  ``amaml.inner_loop`` while the step traces and compiles, then restored."""
  owner = {k: next(m for m in _modules() if hasattr(m, k)) for k in settings}
  saved = {k: getattr(owner[k], k) for k in settings}
  try:
    for k, v in settings.items():
      setattr(owner[k], k, v)
    return throughput.build(args)
  finally:
    for k, v in saved.items():
      setattr(owner[k], k, v)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE")
  ap.add_argument("--config", default="omniglot-5w1s", choices=["omniglot-5w1s", "omniglot-20w1s"])
  impls = [i.removeprefix("amaml-") for i in throughput.AMAML_IMPLS if i.startswith("amaml-")]
  ap.add_argument("--impl", default="maml", choices=impls)
  ap.add_argument("--impl-b", default=None, choices=impls, help="the set side's (default --impl)")
  ap.add_argument("--steps", type=int, default=2, help="steps of each side per round")
  ap.add_argument("--rounds", type=int, default=8)
  args = ap.parse_args(argv)
  import jax

  settings = parse_settings(args.set, *_modules())
  impl_b = args.impl_b or args.impl
  if not settings and impl_b == args.impl:
    raise SystemExit("nothing to compare: pass --set NAME=VALUE or an --impl-b other than --impl")
  common = dict(
    config=args.config, conv_impl="auto", pool=4, steps=args.steps, warmup=1, seed=0,
    alpha_lr=1e-4, donate=False,
  )  # fmt: skip
  sides = {}
  for name, s, impl in (("base", {}, args.impl), ("set", settings, impl_b)):
    b = build(SimpleNamespace(impl=f"amaml-{impl}", **common), s)
    state = jax.block_until_ready(b.carry(b.compiled(b.state, b.pool[0])))  # warm-up
    sides[name] = [b, state, []]
    print(f"{name}: compiled in {b.compile_s:.1f} s", flush=True)
  for r in range(args.rounds):
    for name in ("base", "set") if r % 2 == 0 else ("set", "base"):
      b, state, times = sides[name]
      t0 = time.perf_counter()
      for i in range(args.steps):
        state = b.carry(b.compiled(state, b.pool[(i + 1) % len(b.pool)]))
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / args.steps)
      sides[name][1] = state
    print(f"round {r}: base {sides['base'][2][-1]:.3f} s/step, set {sides['set'][2][-1]:.3f}")
  base, new = sides["base"][2], sides["set"][2]
  row = dict(
    config=args.config, impl=f"amaml-{args.impl}", impl_b=f"amaml-{impl_b}", settings=settings,
    steps=args.steps,
    base_s=statistics.median(base), set_s=statistics.median(new),
    ratio=statistics.median(n / b for n, b in zip(new, base)),
    pair_ratios=[round(n / b, 3) for n, b in zip(new, base)],
    malloc_tuned=all(k in os.environ for k in throughput.MALLOC_ENV),
    versions={"jax": jax.__version__},
  )  # fmt: skip
  print(json.dumps(row))


if __name__ == "__main__":
  main()
