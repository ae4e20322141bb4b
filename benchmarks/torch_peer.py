"""The torch.func MAML peer of ``shared/peers`` on any PyTorch device (CPU or CUDA).

``shared/peers/torchfunc_maml.py`` times its meta-step on the CPU only. This script reuses
its model (``torch_common.make_model``), its shared numpy initialisation, its pre-sampled
episodes and its meta-step (``torchfunc_maml.build_step``), and runs them on ``--device``,
synchronising the device around each timed step. It prints one JSON line in the format of
``benchmarks/throughput.py``'s workers, which runs it as the ``torchfunc-loop-cuda`` peer:

    python benchmarks/torch_peer.py --config omniglot-5w1s --device cuda --steps 20
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402

common = _peers.peers_common()  # puts shared/peers on sys.path

import torch  # noqa: E402
import torch_common as tc  # noqa: E402  (shared/peers)
import torchfunc_maml  # noqa: E402  (shared/peers)


def main(argv=None):
  ap = common.base_argparser(__doc__)
  ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  ap.add_argument("--mode", choices=["vmap", "loop"], default="loop")
  ap.add_argument("--bn", choices=["native", "prim"], default="native")
  ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
  args = ap.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  dev = torch.device(args.device)
  cfg = common.CONFIGS[args.config]
  n_pool = min(args.pool, args.steps + args.warmup)
  pool = [
    tuple(t.to(dev) for t in tc.to_torch_batch(b)) for b in common.make_pool(cfg, args.seed, n_pool)
  ]
  model = tc.make_model(cfg["ways"], args.seed, bn=args.bn).to(dev)
  step, _ = torchfunc_maml.build_step(model, cfg, args.mode)
  opt = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  times, losses = [], []
  for i in range(args.warmup + args.steps):
    sync()
    t0 = time.perf_counter()
    loss, _ = step(pool[i % n_pool])
    opt.step()
    loss = float(loss)  # waits for the device
    sync()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
    losses.append(loss)
  s = common.summarize(times)
  name = f"torchfunc-{args.mode}" + ("-cuda" if dev.type == "cuda" else "")
  versions = tc.versions()
  if dev.type == "cuda":
    versions["gpu"] = torch.cuda.get_device_name(dev)
  common.emit(
    dict(
      impl=name,
      config=args.config,
      **s,
      tasks_per_s=cfg["meta_batch"] / s["median_step_s"],
      first_meta_loss=losses[0],
      final_meta_loss=losses[-1],
      losses=[round(l, 4) for l in losses],
      warmup=args.warmup,
      seed=args.seed,
      versions=versions,
    )
  )


if __name__ == "__main__":
  main()
