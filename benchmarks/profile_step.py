"""Where one meta-step's time goes: amaml's Conv4 step and the torch.func peer, op by op.

    python benchmarks/profile_step.py --config omniglot-5w1s --steps 2
    python benchmarks/profile_step.py --config omniglot-20w1s --impls amaml-maml torchfunc-loop

Each implementation runs in its own process, one after another, on the step that
``benchmarks/throughput.py`` times (the peers' episodes and initial weights, the same
allocator settings). After compiling and ``--warmup`` steps it times ``--timed`` steps
without the profiler (``step_s``, the median), then profiles ``--steps`` steps: amaml under
``jax.profiler`` (XLA:CPU's thunks, the self time of each op on every thread), the peer
under ``torch.profiler`` (the self CPU time of each ``aten`` op). Both sides' ops are
sorted into the same categories (:func:`category`) and each process prints one JSON line:
the step time, the wall and op seconds per profiled step, the seconds per category and the
ops that take the most. A table of the categories follows.

Reading it:

- XLA runs independent thunks on both cores at once, so its op time can exceed the wall
  time; torch's intra-op threads are inside one op's time.
- XLA's convolutions (Eigen's) run asynchronously on its thread pool: the trace holds
  their dispatch, not their work, so amaml's ``convolutions`` row is far below their cost
  (``benchmarks/conv_backends.py`` times them alone).
- XLA fuses what PyTorch runs as separate ops: amaml's max-pool, batch norm and ReLU are
  inside its element-wise and reduction fusions (``pooling`` and ``batch norm`` stay empty
  on its side), and YNNPACK's fusions hold both matrix products and reductions.
- Tracing slows amaml's step (thousands of small thunks in the per-task loops) more than
  the peer's: compare the rows with each other, and the steps by ``step_s``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _peers  # noqa: E402
import throughput  # noqa: E402

#: The categories of both sides, in the table's order.
CATEGORIES = (
  "convolutions",
  "products",
  "pooling",
  "batch norm",
  "element-wise",
  "reductions",
  "copies and transposes",
  "pads, slices, concatenations",
  "fills",
  "control",
  "other",
)
_XLA_RULES = (  # (pattern on the thunk's name without its ".N" suffix, category), first match
  (r"^convolution|^conv_general", "convolutions"),
  (r"ynn|dot|gemm|matmul", "products"),
  (r"transpose|copy", "copies and transposes"),
  (r"pad|slice|concatenate", "pads, slices, concatenations"),
  (r"(^|_)broadcast(_fusion)?$|memset|^constant", "fills"),
  (r"reduce|select-and-scatter|scatter", "reductions"),
  (r"^(while|conditional|call|kernel|sort)$", "control"),
  (
    r"fusion|^(add|multiply|subtract|divide|maximum|minimum|select|compare|exp|log)",
    "element-wise",
  ),
)
_TORCH_RULES = (  # (pattern on the aten op's name, category), first match
  (r"conv", "convolutions"),
  (r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm|dot)$", "products"),
  (r"pool", "pooling"),
  (r"batch_norm", "batch norm"),
  (r"copy|clone|contiguous|permute|transpose|::t$|::to$", "copies and transposes"),
  (r"cat$|pad|slice|narrow|index|select|stack|split|chunk", "pads, slices, concatenations"),
  (r"fill_|zero_|zeros|ones|empty|full", "fills"),
  (r"::(sum|mean|var|std|var_mean|amax|amin|max|min|norm|logsumexp)$", "reductions"),
  (
    r"add|sub|mul|div|relu|threshold|where|neg|sqrt|exp|log|softmax|nll|cross_entropy|"
    r"pow|lerp|addcmul|addcdiv|sign|clamp|foreach|::(eq|ne|lt|gt|le|ge)_?$",
    "element-wise",
  ),
)


def category(name: str, side: str) -> str:
  """The category of an op: ``side`` is ``"xla"`` (a thunk's name, such as
  ``"loop_add_fusion.12"``) or ``"torch"`` (an op, such as ``"aten::mkldnn_convolution"``).

  >>> category("transpose_copy_fusion.3", "xla"), category("aten::max_pool2d", "torch")
  ('copies and transposes', 'pooling')
  """
  rules = _XLA_RULES if side == "xla" else _TORCH_RULES
  bare = re.sub(r"\.\d+$", "", name)
  for pattern, cat in rules:
    if re.search(pattern, bare, re.IGNORECASE):
      return cat
  return "other"


def self_times(events) -> dict:
  """Each op name's self time (its duration less that of the events nested in it on its
  thread), summed, in the events' unit. ``events``: trace events with ``name``, ``ts``,
  ``dur`` and a thread (``pid``, ``tid``)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e.get("pid"), e.get("tid"))].append(e)
  out = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [end, name, self time so far]
    for e in evs:
      while stack and stack[-1][0] <= e["ts"]:
        _, name, own = stack.pop()
        out[name] += own
      if stack:
        stack[-1][2] -= e["dur"]
      stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
    for _, name, own in stack:
      out[name] += own
  return dict(out)


def xla_op_seconds(trace_dir: str) -> dict:
  """Self seconds of every XLA:CPU thunk in the Perfetto trace that ``jax.profiler.trace
  (trace_dir, create_perfetto_trace=True)`` wrote (the events with an ``hlo_op``)."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  return {k: v / 1e6 for k, v in self_times(ops).items()}  # microseconds


def summarize(op_seconds: dict, side: str, steps: int, top: int = 10) -> dict:
  """Per step: the seconds of each category and of the ``top`` ops, and their total."""
  cats = collections.Counter()
  for name, s in op_seconds.items():
    cats[category(name, side)] += s / steps
  ops = sorted(op_seconds.items(), key=lambda kv: -kv[1])[:top]
  return {
    "op_s_per_step": sum(cats.values()),
    "categories": {c: cats.get(c, 0.0) for c in CATEGORIES},
    "top_ops": [(name, s / steps, category(name, side)) for name, s in ops],
  }


def amaml_worker(args) -> dict:
  import jax

  b = throughput.build(args)
  state, times = b.state, []
  for i in range(args.warmup + args.timed):
    t0 = time.perf_counter()
    state = jax.block_until_ready(b.carry(b.compiled(state, b.pool[i % len(b.pool)])))
    times.append(time.perf_counter() - t0)
  step = statistics.median(times[args.warmup :])
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for i in range(args.steps):
        state = b.carry(b.compiled(state, b.pool[i % len(b.pool)]))
      jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / args.steps
    ops = xla_op_seconds(tmp)
  versions = {"jax": jax.__version__, "backend": jax.default_backend()}
  summary = summarize(ops, "xla", args.steps)
  return dict(step_s=step, wall_s_per_step=wall, **summary, versions=versions)


def torch_worker(args) -> dict:
  common = _peers.peers_common()
  import torch
  import torch_common as tc  # shared/peers
  import torchfunc_maml  # shared/peers

  torch.set_num_threads(args.threads)
  cfg = common.CONFIGS[args.config]
  pool = [tc.to_torch_batch(b) for b in common.make_pool(cfg, args.seed, args.pool)]
  model = tc.make_model(cfg["ways"], args.seed)
  step, _ = torchfunc_maml.build_step(model, cfg, "loop")
  opt = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
  times = []
  for i in range(args.warmup + args.timed):
    t0 = time.perf_counter()
    step(pool[i % len(pool)])
    opt.step()
    times.append(time.perf_counter() - t0)
  acts = [torch.profiler.ProfilerActivity.CPU]
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=acts) as prof:
    for i in range(args.steps):
      step(pool[i % len(pool)])
      opt.step()
  wall = (time.perf_counter() - t0) / args.steps
  ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
  versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  summary = summarize(ops, "torch", args.steps)
  return dict(
    step_s=statistics.median(times[args.warmup :]),
    wall_s_per_step=wall,
    **summary,
    versions=versions,
  )


def table(rows: list[dict]) -> str:
  """The categories (seconds per step) with one column per implementation."""
  names = [r["impl"] for r in rows]
  lines = [
    "| category | " + " | ".join(names) + " |",
    "| --- | " + " | ".join("---" for _ in names) + " |",
  ]
  for c in CATEGORIES:
    vals = [r["categories"].get(c, 0.0) for r in rows]
    if any(v >= 0.005 for v in vals):
      lines.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
  totals = (
    ("op time in the trace", "op_s_per_step"),
    ("wall time, profiled", "wall_s_per_step"),
    ("step, not profiled", "step_s"),
  )
  for label, key in totals:
    lines.append(f"| **{label}** | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="omniglot-5w1s", choices=["omniglot-5w1s", "omniglot-20w1s"])
  ap.add_argument(
    "--impls",
    nargs="+",
    default=["amaml-maml", "amaml-alpha", "torchfunc-loop"],
    choices=["amaml-maml", "amaml-alpha", "torchfunc-loop"],
  )
  ap.add_argument("--steps", type=int, default=2, help="profiled meta-steps")
  ap.add_argument("--warmup", type=int, default=1, help="steps after compiling, not timed")
  ap.add_argument("--timed", type=int, default=3, help="steps timed without the profiler")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=2, help="the peer's torch threads")
  ap.add_argument("--peers-python", default=sys.executable, help="a Python with torch")
  ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:  # throughput.build's settings
    args.impl, args.conv_impl, args.pool, args.alpha_lr, args.donate = (
      args.worker,
      "auto",
      args.warmup + args.timed + args.steps,
      1e-4,
      False,
    )
    fn = torch_worker if args.worker.startswith("torch") else amaml_worker
    print(json.dumps(dict(impl=args.worker, config=args.config, steps=args.steps, **fn(args))))
    return
  if not _peers.peers_available():
    raise SystemExit(f"profile_step.py needs the peers' episodes: no peers at {_peers.PEERS_DIR}")
  env = dict(os.environ, **throughput.MALLOC_ENV)
  env["PYTHONPATH"] = throughput.ROOT + os.pathsep + env.get("PYTHONPATH", "")
  rows = []
  for impl in args.impls:
    py = args.peers_python if impl.startswith("torch") else sys.executable
    cmd = [py, os.path.abspath(__file__), "--worker", impl, "--config", args.config]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    cmd += ["--timed", str(args.timed), "--threads", str(args.threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
      raise SystemExit(f"{impl} failed:\n{p.stderr[-2000:]}")
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(rows[-1]) + "\n")
  print(f"\n{args.config}, seconds per meta-step ({args.steps} profiled steps):\n")
  print(table(rows))


if __name__ == "__main__":
  main()
