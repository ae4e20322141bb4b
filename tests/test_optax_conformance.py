"""``amaml.hypergradient`` under optax's own common optimizer tests.

The test bodies are optax's, read from the installed ``optax.contrib._common_test``
(absl keeps each undecorated body as ``__wrapped__`` of its generated cases); only the
grid of optimizers differs: SGD-HD and Adam-HD under every rate rule. The other axes
(targets, dtypes, ``wrap``) are those of optax's decorators. optax finds an optimizer
by name with ``_common_test._get_opt_factory``; each test here patches it to answer
amaml's names.
"""

import functools
import re
from unittest import mock

import optax
from absl.testing import parameterized
from optax.contrib import _common_test as common

import amaml
from amaml import rates

BASES = {"sgd": optax.sgd, "adam": optax.adam}
# keyword arguments per (base, rule), one setting for the four targets. The additive rule
# runs with the HD paper's kappa and its safeguards: the rate kept in [0, 2e-3], 2e-3 being
# 2 / L for Rosenbrock's curvature L ~ 1000 at its minimum (unbounded it falls to -1e9 there
# and the parameters to -inf). The normalized rule with SGD takes 0.01: at the default 0.05
# the rate overshoots 2 / L faster than it can back off and Rosenbrock diverges. Adam's
# normalized rule runs at the defaults (no hyper_lr given).
KWARGS = {
  ("sgd", "additive"): dict(
    learning_rate=1e-3, hyper_lr=rates.PAPER_ALPHA_LR, min_rate=0.0, max_rate=2e-3
  ),
  ("sgd", "log"): dict(learning_rate=1e-3, hyper_lr=1e-2),
  ("sgd", "normalized"): dict(learning_rate=1e-3, hyper_lr=1e-2),
  ("adam", "additive"): dict(learning_rate=1e-2, hyper_lr=rates.PAPER_BETA_LR),
  ("adam", "log"): dict(learning_rate=1e-2, hyper_lr=1e-3),
  ("adam", "normalized"): dict(learning_rate=1e-2),
}


def _name(base, rule):
  return f"amaml_hd_{base}_{rule}"


FACTORIES = {
  _name(b, r): functools.partial(amaml.hypergradient, BASES[b], rate_rule=r) for b, r in KWARGS
}
OPTIMIZERS = tuple(
  {"opt_name": _name(b, r), "opt_kwargs": kwargs, "wrapper_name": None, "wrapper_kwargs": None}
  for (b, r), kwargs in KWARGS.items()
)
TARGETS = (
  common._setup_parabola,
  common._setup_rosenbrock,
  common._setup_matrix_parabola,
  common._setup_mixed_tensor_target,
)


def _get_opt_factory(opt_name):
  return FACTORIES[opt_name]


def _optax_body(name):
  """optax's ``ContribTest.<name>`` before parametrisation."""
  return getattr(common.ContribTest, f"{name}0").__wrapped__


class HypergradientCommonTest(parameterized.TestCase):
  """optax's ``ContribTest`` with amaml's optimizers."""

  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(common, "_get_opt_factory", _get_opt_factory))

  test_optimizers_accept_extra_args = parameterized.product(OPTIMIZERS, wrap=[True, False])(
    _optax_body("test_optimizers_accept_extra_args")
  )
  test_optimizers = parameterized.product(OPTIMIZERS, target=TARGETS, dtype=("float32",))(
    _optax_body("test_optimizers")
  )
  test_optimizers_can_be_wrapped_in_inject_hyperparams = parameterized.product(OPTIMIZERS)(
    _optax_body("test_optimizers_can_be_wrapped_in_inject_hyperparams")
  )
  test_preserve_dtype = parameterized.product(OPTIMIZERS, dtype=("bfloat16", "float32"))(
    _optax_body("test_preserve_dtype")
  )
  test_gradient_accumulation = parameterized.product(OPTIMIZERS, dtype=("bfloat16", "float32"))(
    _optax_body("test_gradient_accumulation")
  )
  test_state_shape_dtype_shard_stability = parameterized.product(
    OPTIMIZERS,
    dtype=(common.jnp.float16, common.jnp.bfloat16, common.jnp.float32, common.jnp.float64),
  )(_optax_body("test_state_shape_dtype_shard_stability"))
  test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such = parameterized.product(
    OPTIMIZERS
  )(_optax_body("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"))


def _test_names(cls):
  """The test names of a parameterized class, without their case numbers."""
  return {re.sub(r"\d+$", "", n) for n in dir(cls) if n.startswith("test_")}


def test_every_optax_common_test_runs_on_every_amaml_optimizer():
  """The grid above is optax's whole ContribTest (a test optax adds fails here until it
  runs on amaml's optimizers too), with every one of the six optimizers in each test."""
  assert _test_names(HypergradientCommonTest) == _test_names(common.ContribTest)
  cases = [n for n in dir(HypergradientCommonTest) if n.startswith("test_")]
  assert len(cases) == 16 * len(OPTIMIZERS) == 96
  with mock.patch.object(common, "_get_opt_factory", _get_opt_factory):
    for name in FACTORIES:
      assert common._get_opt_factory(name) is FACTORIES[name]
