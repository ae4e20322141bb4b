"""amaml: Alpha MAML in JAX.

MAML whose inner learning rate ``alpha`` adapts online by hypergradient descent
(Behl, Baydin & Torr, 2019), whose initial ``alpha`` can be searched on the first tasks
(:func:`search_alpha`), and whose meta learning rate ``beta`` is Adam's 1e-3 (the default),
follows its hypergradient too (the paper's), or is set by a learning-rate-free optimizer,
as small pure functions: :func:`alpha_maml` (amaml's
tuning-free default) / :func:`alpha_maml_paper` / :func:`maml` / :func:`fomaml` build a
jitted meta step over a batch of tasks; :func:`hypergradient` (module :mod:`amaml.hd`) is the Optax
transform that adapts any optimizer's learning rate. :func:`imaml` is iMAML, its meta-gradient by
implicit differentiation (module :mod:`amaml.imaml`).
"""

from amaml import losses
from amaml import models
from amaml.hd import HypergradientState, current_hypergradient, current_learning_rate, hypergradient
from amaml.imaml import imaml
from amaml.inner import adapt, init_alpha
from amaml.meta import MetaLearner, MetaState
from amaml.methods import (
  alpha_maml,
  alpha_maml_paper,
  anil,
  epsilon_schedule,
  fomaml,
  maml,
  maml_plus_plus,
  meta_sgd,
  protonet,
  reptile,
)
from amaml.rates import hd_step, search_alpha
from amaml.sinusoid import sinusoid_tasks
from amaml.stats import mean_confidence_interval
from amaml.task import TaskBatch
from amaml.xla_options import jit

__all__ = [
  "HypergradientState",
  "MetaLearner",
  "MetaState",
  "TaskBatch",
  "adapt",
  "alpha_maml",
  "alpha_maml_paper",
  "anil",
  "current_hypergradient",
  "current_learning_rate",
  "epsilon_schedule",
  "fomaml",
  "hd_step",
  "hypergradient",
  "imaml",
  "init_alpha",
  "jit",
  "losses",
  "maml",
  "maml_plus_plus",
  "mean_confidence_interval",
  "meta_sgd",
  "models",
  "protonet",
  "reptile",
  "search_alpha",
  "sinusoid_tasks",
]
__version__ = "0.2.0"
