"""Meta-training throughput of second-order MAML / Alpha MAML on Omniglot Conv4, against
the PyTorch peers of ``shared/peers`` measured in the same run.

    python benchmarks/throughput.py --config omniglot-5w1s [--steps 5 --warmup 1]
    python benchmarks/throughput.py --config omniglot-5w1s omniglot-20w1s --peers --rounds 3

Every measurement is its own process (so compile caches, memory and peak RSS are its own),
run one after another and interleaved per round (amaml-maml, amaml-alpha, peer, ...), so
that load from other users of the machine hits all alike. Each prints one JSON line:
median / p10 / p90 seconds per meta-step, tasks per second, compile seconds, XLA's flop
count of the compiled step, the fraction of a 200 GFLOP/s fp32 peak that is, peak RSS, the
meta-losses. With ``--peers`` a summary line gives the ratio peer / amaml per config.

Implementations (``--impls``):
  amaml-maml   ``amaml.maml(...)`` step: second-order MAML, alpha and beta fixed.
  amaml-alpha  ``amaml.alpha_maml(...)`` step: amaml's default, alpha adapted by its
               hypergradient, with backtracking.
  amaml-alpha-no-backtrack  the same without backtracking.
  raw          a hand-written jitted meta-step (value_and_grad of the mean over vmapped
               tasks, inner SGD, optax.adam): the floor of what amaml.meta adds.
The amaml steps run with ``track_pre_adaptation=False`` (the peers do not evaluate the query
loss before adaptation either); backtracking needs that loss, so ``amaml-alpha`` evaluates
it all the same: one more forward pass over the query sets. Models: ``amaml.models.Conv4``
with ``conv_impl`` (default ``auto`` = the ``tasks`` form on CPU), started from the peers'
numpy weights (``shared/peers/common.init_params``), on the peers' pre-sampled episodes, so
the meta-loss of MAML's first step equals the peers' (printed as ``first_meta_loss``).

Memory allocator: XLA:CPU allocates its temporary buffers per execution; with glibc's
defaults the large ones are fresh ``mmap`` s whose pages fault in on every step. By default
every worker process (amaml's and the peers') gets ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` so that freed memory is reused;
``--no-malloc-tuning`` turns that off.

The findings of the probes behind the Conv4 step (formulations, XLA flags, the pool
miscompile, the profile) are in BENCHMARKS.md, "Omniglot meta-step throughput";
``benchmarks/profile_step.py`` profiles this step op by op beside the peer's (``build``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _peers  # noqa: E402

PEAK_GFLOPS = 200.0  # fp32 matmul peak of the 2-core reference machine (shared/peers/README)
MALLOC_ENV = {
  "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
  "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
  "MALLOC_TOP_PAD_": str(1 << 30),
}
PEER_IMPLS = {
  "torchfunc-loop": ["torchfunc_maml.py", "--mode", "loop"],
  "torchopt-metasgd": ["l2l_maml.py", "--lib", "torchopt"],
  # the same torch.func step on a CUDA device (benchmarks/torch_peer.py)
  "torchfunc-loop-cuda": [
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py"),
    "--mode",
    "loop",
    "--device",
    "cuda",
  ],
}
AMAML_IMPLS = ("amaml-maml", "amaml-alpha", "amaml-alpha-no-backtrack", "raw")


def _summ(times):
  import numpy as np

  t = np.asarray(times, np.float64)
  return dict(
    median_step_s=float(np.median(t)),
    p10=float(np.percentile(t, 10)),
    p90=float(np.percentile(t, 90)),
    n_timed=int(t.size),
  )


def _flops(compiled):
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return float(ca.get("flops", float("nan")))
  except Exception:  # noqa: BLE001 (cost analysis is best-effort)
    return float("nan")


def build(args):
  """One implementation's compiled step on one config, in this process: a namespace with
  ``compiled``, ``state``, ``pool`` (the peers' episodes), ``loss_of`` and ``carry`` (of a
  step's output), ``compile_s``, ``flops`` and the peers' ``cfg``."""
  from types import SimpleNamespace

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import amaml
  from amaml.models import Conv4

  common = _peers.peers_common()
  cfg = common.CONFIGS[args.config]
  ways, inner_steps, alpha = cfg["ways"], cfg["inner_steps"], cfg["alpha"]
  n_pool = min(args.pool, args.steps + args.warmup)
  pool = [
    amaml.TaskBatch(
      jnp.asarray(xs[..., None]),
      jnp.asarray(ys.astype(np.int32)),
      jnp.asarray(xq[..., None]),
      jnp.asarray(yq.astype(np.int32)),
    )
    for xs, ys, xq, yq in common.make_pool(cfg, args.seed, n_pool)
  ]
  model = Conv4(ways, conv_impl=args.conv_impl)
  params = _peers.conv4_params_from_torch(common.init_params(args.seed, ways))
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  loss_fn = amaml.losses.cross_entropy(apply_fn)

  if args.impl.startswith("amaml-"):
    kw = dict(
      alpha=alpha,
      beta=cfg["outer_lr"],
      inner_steps=inner_steps,
      track_pre_adaptation=False,
      donate=args.donate,
    )
    learner = (
      amaml.maml(loss_fn, **kw)
      if args.impl == "amaml-maml"
      else amaml.alpha_maml(
        loss_fn, alpha_lr=args.alpha_lr, backtrack=args.impl == "amaml-alpha", **kw
      )
    )
    state = learner.init(params)
    step = learner.step
    loss_of = lambda out: out[1]["loss"]
    carry = lambda out: out[0]
    lower = lambda: step.lower(state, pool[0])
  elif args.impl == "raw":
    opt = optax.adam(cfg["outer_lr"])

    def xent(p, x, y):
      return loss_fn(p, x, y)[0]

    def task_loss(p, xs, ys, xq, yq):
      for _ in range(inner_steps):
        g = jax.grad(xent)(p, xs, ys)
        p = jax.tree.map(lambda a, b: a - alpha * b, p, g)
      return xent(p, xq, yq)

    def meta_step(st, batch):
      p, o = st
      loss, g = jax.value_and_grad(
        lambda p: jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, *batch))
      )(p)
      u, o = opt.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss

    state = (params, opt.init(params))
    step = jax.jit(meta_step, donate_argnums=(0,) if args.donate else ())
    loss_of = lambda out: out[1]
    carry = lambda out: out[0]
    lower = lambda: step.lower(state, pool[0])
  else:
    raise SystemExit(f"unknown impl {args.impl}")

  t0 = time.perf_counter()
  compiled = lower().compile()
  compile_s = time.perf_counter() - t0
  return SimpleNamespace(
    compiled=compiled,
    state=state,
    pool=pool,
    loss_of=loss_of,
    carry=carry,
    compile_s=compile_s,
    flops=_flops(compiled),
    cfg=cfg,
  )


def worker(args) -> dict:
  """One implementation, one config, in this process."""
  import jax

  b = build(args)
  state, times, losses = b.state, [], []
  for i in range(args.warmup + args.steps):
    t1 = time.perf_counter()
    out = b.compiled(state, b.pool[i % len(b.pool)])
    loss = float(jax.block_until_ready(b.loss_of(out)))
    dt = time.perf_counter() - t1
    state = b.carry(out)
    losses.append(loss)
    if i >= args.warmup:
      times.append(dt)
  s = _summ(times)
  return dict(
    impl=args.impl,
    config=args.config,
    conv_impl=args.conv_impl,
    **s,
    tasks_per_s=b.cfg["meta_batch"] / s["median_step_s"],
    compile_s=b.compile_s,
    xla_flops_per_step=b.flops,
    achieved_gflops=b.flops / s["median_step_s"] / 1e9,
    fraction_of_peak=b.flops / s["median_step_s"] / 1e9 / args.peak_gflops,
    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    first_meta_loss=losses[0],
    final_meta_loss=losses[-1],
    losses=[round(l, 4) for l in losses],
    warmup=args.warmup,
    seed=args.seed,
    malloc_tuned=all(k in os.environ for k in MALLOC_ENV),
    versions={
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
    },
  )


def _run(cmd, cwd, env, timeout):
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    rc, out, err = p.returncode, p.stdout, p.stderr
  except subprocess.TimeoutExpired as e:
    rc, out, err = "timeout", e.stdout or "", e.stderr or ""
    out = out.decode() if isinstance(out, bytes) else out
    err = err.decode() if isinstance(err, bytes) else err
  rec = None
  for line in (out or "").splitlines()[::-1]:
    if line.startswith("{"):
      rec = json.loads(line)
      break
  if rec is None or rc != 0:
    rec = dict(error=f"rc={rc}", stderr_tail=(err or "")[-1500:])
  rec["process_wall_s"] = time.perf_counter() - t0
  return rec


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--config", nargs="+", default=["omniglot-5w1s"], choices=["omniglot-5w1s", "omniglot-20w1s"]
  )
  ap.add_argument("--steps", type=int, default=5, help="timed meta-steps")
  ap.add_argument("--warmup", type=int, default=1, help="untimed meta-steps after compiling")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--pool", type=int, default=16, help="pre-sampled meta-batches, cycled")
  ap.add_argument(
    "--impls", nargs="+", default=["amaml-maml", "amaml-alpha"], choices=list(AMAML_IMPLS)
  )
  ap.add_argument(
    "--conv-impl",
    nargs="+",
    default=["auto"],
    choices=["auto", "matmul", "tasks", "xla"],
    help="Conv4's conv_impl; several: each amaml impl runs once per conv_impl, interleaved, "
    "named impl@conv_impl",
  )
  ap.add_argument("--alpha-lr", type=float, default=1e-4)
  ap.add_argument("--donate", action="store_true", help="donate the state to the step")
  ap.add_argument("--peers", action="store_true", help="also run PyTorch peer(s), interleaved")
  ap.add_argument("--peer-impls", nargs="+", default=["torchfunc-loop"], choices=list(PEER_IMPLS))
  ap.add_argument(
    "--peers-python", default=os.environ.get("PEERS_TORCH_PY", "/tmp/venv-peers/bin/python")
  )
  ap.add_argument("--rounds", type=int, default=1)
  ap.add_argument(
    "--peak-gflops",
    type=float,
    default=PEAK_GFLOPS,
    help="the machine's fp32 peak, for fraction_of_peak (an H100's plain fp32 is about 67,000)",
  )
  ap.add_argument("--no-malloc-tuning", action="store_true")
  ap.add_argument("--timeout", type=float, default=900)
  ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:
    args.impl, args.config, args.conv_impl = args.worker, args.config[0], args.conv_impl[0]
    print(json.dumps(worker(args)), flush=True)
    return

  env = dict(os.environ)
  if not args.no_malloc_tuning:
    env.update(MALLOC_ENV)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  jobs = []
  for cfg in args.config:
    for impl, conv_impl in ((i, c) for i in args.impls for c in args.conv_impl):
      cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--config",
        cfg,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--pool",
        str(args.pool),
        "--conv-impl",
        conv_impl,
        "--alpha-lr",
        str(args.alpha_lr),
        "--peak-gflops",
        str(args.peak_gflops),
      ] + (["--donate"] if args.donate else [])
      name = f"{impl}@{conv_impl}" if len(args.conv_impl) > 1 else impl
      jobs.append((cfg, name, cmd, ROOT))
    if args.peers:
      if not _peers.peers_available():
        raise SystemExit(f"--peers: no peers at {_peers.PEERS_DIR}")
      for impl in args.peer_impls:
        cmd = (
          [args.peers_python]
          + PEER_IMPLS[impl]
          + [
            "--config",
            cfg,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--seed",
            str(args.seed),
            "--pool",
            str(args.pool),
          ]
        )
        jobs.append((cfg, impl, cmd, _peers.PEERS_DIR))

  rows = []
  for rnd in range(args.rounds):
    for cfg, impl, cmd, cwd in jobs:
      load = os.getloadavg()[0]
      rec = _run(cmd, cwd, env, args.timeout)
      rec["impl"] = impl  # the job's name: impl@conv_impl when several conv_impls run
      rec.setdefault("config", cfg)
      rec.update(round=rnd, loadavg_before=load)
      rows.append(rec)
      line = json.dumps(rec)
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")

  # summary: median over rounds of each impl's median, and peer / amaml ratios
  summary = {}
  for cfg in args.config:
    meds = {}
    for r in rows:
      if r["config"] == cfg and "median_step_s" in r:
        meds.setdefault(r["impl"], []).append(r["median_step_s"])
    med = {k: statistics.median(v) for k, v in meds.items()}
    ratios = {}
    for peer in (k for k in med if k in PEER_IMPLS):
      for ours in (k for k in med if k.split("@")[0] in AMAML_IMPLS):
        ratios[f"{peer}/{ours}"] = med[peer] / med[ours]
    summary[cfg] = dict(
      median_of_medians_s=med, runs={k: len(v) for k, v in meds.items()}, speedup_vs_peer=ratios
    )
  line = json.dumps(
    dict(
      summary=summary,
      rounds=args.rounds,
      steps=args.steps,
      warmup=args.warmup,
      malloc_tuned=not args.no_malloc_tuning,
    )
  )
  print(line, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
