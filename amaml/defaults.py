"""Each method's defaults, in one place.

The presets (:mod:`amaml.methods`, :mod:`amaml.baselines`, :func:`amaml.imaml`), the run
configuration (:mod:`amaml.configs`) and the command line read them from here. This module
imports nothing, so that ``amaml --help`` stays fast.

>>> BY_METHOD["maml++"]["first_order_steps"], BETA
(25000, 0.001)
"""

#: The outer rate ``beta0`` of a method whose outer optimizer has a fixed rate (Adam's 1e-3).
BETA = 1e-3

#: Per method (the names of ``amaml train --method``): its initial inner rate ``alpha0``, outer
#: rate ``beta``, inner steps, and the method's own options. ``alpha-maml`` adapts both rates;
#: its ``alpha`` is only a start. MAML++: its multi-step loss annealed over 5000 meta steps and
#: first-order gradients for 25000 (10 and 50 epochs of 500; Antoniou et al. 2019). Reptile:
#: its outer step size ``epsilon`` (Nichol et al. 2018). iMAML: ``lam`` and CG steps
#: (Rajeswaran et al. 2019).
BY_METHOD = {
  "alpha-maml": {"alpha": 0.1, "inner_steps": 1},
  "alpha-maml-paper": {"alpha": 0.1, "beta": BETA, "inner_steps": 1},
  "maml": {"alpha": 0.01, "beta": BETA, "inner_steps": 1},
  "meta-sgd": {"alpha": 0.01, "beta": BETA, "inner_steps": 1},
  "maml++": {
    "alpha": 0.1,
    "beta": BETA,
    "inner_steps": 5,
    "multi_step_loss": 5000,
    "first_order_steps": 25000,
  },
  "reptile": {"alpha": 0.1, "inner_steps": 5, "epsilon": 1.0},
  "protonet": {"beta": BETA},
  "imaml": {"alpha": 0.01, "beta": BETA, "inner_steps": 10, "lam": 1.0, "cg_steps": 5},
}
