"""Named experiment configurations; every field can be overridden from the command line.

>>> cfg = get_config("omniglot-5w1s", alpha=0.4)
>>> cfg.ways, cfg.shots, cfg.meta_batch, cfg.alpha, cfg.rate_rule
(5, 1, 32, 0.4, 'normalized')
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from amaml import config_checks, defaults

# the values of the choice fields (amaml.config_checks, with the checks of Config.validate)
from amaml.config_checks import DATASETS, EPSILON_SCHEDULES, METHODS, MODELS, OUTER_OPTIMIZERS
from amaml.config_checks import PROTOCOLS, RATE_RULES, TASKS, TEST_ADAPTATIONS

# each method's outer optimizer when Config.outer_optimizer is None: Reptile SGD, the others
# Adam (amaml's default, alpha-maml, with its rate beta fixed: Config.resolved_beta_lr)
METHOD_OUTER_OPTIMIZER = {
  "alpha-maml": "adam",
  "alpha-maml-paper": "adam",
  "maml": "adam",
  "fomaml": "adam",
  "meta-sgd": "adam",
  "anil": "adam",
  "maml++": "adam",
  "protonet": "adam",
  "imaml": "adam",
  "reptile": "sgd",
}
# the outer rate beta0 when Config.beta is None (Adam's, or SGD's for protonet --outer_optimizer
# sgd). Reptile's outer step is epsilon instead: epsilon0 = 1, annealed linearly to 0 over the
# run (Nichol et al. 2018), the rate of its outer optimizer (SGD).
DEFAULT_BETA = defaults.BETA
DEFAULT_EPSILON = defaults.BY_METHOD["reptile"]["epsilon"]
# Reptile's own inner loop, which get_config applies to the fields its caller does not set
# (a Config built directly keeps the plain defaults). Reptile's outer step has no Adam to
# tame it: with 1 inner step it is plain SGD on the support loss at rate epsilon * alpha, and
# alpha = 0.1 diverges on sinusoid (so does 0.05 with 5 steps). On images, its paper's inner
# Adam at 1e-3 for 5 steps (Nichol et al. 2018, Omniglot); on sinusoid SGD at 0.02 for 5
# steps. 5 steps, not 1: with one step Reptile is joint training on every task's support set.
METHOD_DEFAULTS = {
  ("reptile", "sinusoid"): {"alpha": 0.02, "inner_steps": 5},
  ("reptile", "omniglot"): {"inner_optimizer": "adam", "alpha": 1e-3, "inner_steps": 5},
  ("reptile", "image_folder"): {"inner_optimizer": "adam", "alpha": 1e-3, "inner_steps": 5},
}


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
  """A ``Config`` field with its documentation: the command line's help text comes from here."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run. Every field is a command-line flag; its help text is its
  ``metadata["help"]`` (``amaml train --help``). Sinusoid uses ``shots``/``queries``
  as points per task."""

  task: str = _field("sinusoid", "the problem", TASKS)
  method: str = _field(
    "alpha-maml",
    "the meta-learning method: alpha-maml is amaml's "
    "tuning-free default, alpha-maml-paper the paper's additive rule",
    METHODS,
  )
  # episodes
  ways: int = _field(1, "classes per task (1 for sinusoid)")
  shots: int = _field(10, "support examples per class")
  queries: int = _field(10, "query examples per class")
  meta_batch: int = _field(25, "tasks per meta step")
  # model
  model: str = _field(
    "conv4",
    "the image tasks' network: conv4 (MAML's) or resnet12 "
    "(MetaOptNet's, 64-160-320-640 filters; --hidden does not apply)",
    MODELS,
  )
  hidden: int = _field(40, "hidden units (MLP) or filters (Conv4)")
  conv_impl: str = _field(
    "auto",
    "Conv4's and ResNet-12's convolution: tasks (one lax.conv per task, "
    "the CPU's), matmul (patches), xla (lax.conv, cuDNN on GPU) or auto (by backend)",
    ("auto", "tasks", "matmul", "xla"),
  )
  # inner loop
  inner_steps: int = _field(1, "inner SGD steps per task in training (reptile: 5)")
  unroll: bool = _field(True, "unroll the inner loop (faster steps); false: a rolled lax.scan")
  remat: bool = _field(
    False, "recompute inner steps in the backward pass: less memory, more time (rolled loop)"
  )
  tasks_at_once: int | None = _field(
    None,
    "how many tasks of a meta-batch run together: 0 all (one vmap), k groups of k in a "
    "loop, each group's meta-gradient taken before the next; none: one at a time for "
    "large tasks (images) on a single CPU device, else all",
  )
  alpha: float = _field(
    0.1,
    "initial inner rate alpha0 (alpha-maml: replaced by --alpha_search's choice, then "
    "adapted; reptile: 0.02 on sinusoid, 1e-3 with its inner adam on images)",
  )
  multi_step_loss: int = _field(
    0,
    "MAML++'s multi-step loss, its weights annealed over "
    f"this many meta steps; 0: off (maml++: {defaults.BY_METHOD['maml++']['multi_step_loss']})",
  )
  first_order_steps: int = _field(
    0,
    "MAML++'s derivative-order annealing: first order for "
    "this many meta steps, then second; 0: off "
    f"(maml++: {defaults.BY_METHOD['maml++']['first_order_steps']})",
  )
  alpha_per_step: bool | None = _field(
    None,
    "one set of inner rates per inner step (MAML++'s "
    "per-step rates); none: the method's default (true for "
    "maml++, false for the others)",
  )
  per_step_params: str | None = _field(
    None,
    "regular expression over parameter paths that get "
    "one copy per inner step, learned by the outer loop only "
    "(MAML++'s per-step batch norm: ^norm); none: the "
    "method's default (maml++: ^norm on Conv4, "
    "^block\\d+/norm on ResNet-12, else off); empty: off",
  )
  alpha_granularity: str | None = _field(
    None,
    "how many inner rates alpha-maml adapts: one (scalar), one per parameter tensor "
    "(tensor) or one per parameter; none: the method's own (alpha-maml: tensor; "
    "alpha-maml-paper and maml: scalar; meta-sgd: parameter; maml++: tensor)",
    ("scalar", "tensor", "parameter"),
  )
  inner_optimizer: str = _field(
    "sgd",
    "the inner loop's optimizer, its rate alpha (adapted "
    "through its state by alpha-maml; reptile: adam on images)",
    ("sgd", "momentum", "adam"),
  )
  inner_params: str = _field(
    "",
    "regular expression over parameter paths (conv0/kernel, "
    "head/bias, ...) that the inner loop adapts; empty: all of "
    "them (anil: the model's head)",
  )
  imaml_lambda: float = _field(
    1.0,
    "imaml: the regularisation strength lambda (the inner loop "
    "minimises the support loss + lambda/2 |phi - theta|^2 by "
    "inner_steps steps at alpha; raise --inner_steps to solve it)",
  )
  cg_steps: int = _field(5, "imaml: conjugate-gradient steps for the implicit meta-gradient")
  # outer loop
  beta: float | None = _field(
    None,
    "outer rate (beta0) of outer_optimizer adam or sgd: "
    "adapted by hypergradient at --beta_lr for the alpha-maml methods (alpha-maml's own "
    "Adam: fixed unless --beta_lr is given), fixed for the others (reptile: use --epsilon; "
    "--beta is its old, deprecated name there); none: 1e-3",
  )
  epsilon: float | None = _field(
    None,
    "reptile's outer step size epsilon0, the rate of its "
    "outer optimizer: theta += epsilon * mean(theta' - theta); "
    "none: 1.0 with its sgd (Nichol et al. 2018), 1e-3 with "
    "adam",
  )
  epsilon_schedule: str | None = _field(
    None,
    "reptile's epsilon over the run: constant, or linear from epsilon0 to 0 at "
    "--iterations (the paper's); none: linear",
    EPSILON_SCHEDULES,
  )
  outer_optimizer: str | None = _field(
    None,
    "outer optimizer: adam (its rate beta adapted by hypergradient for the alpha-maml "
    "methods, fixed for maml) or a learning-rate-free one from optax.contrib (beta then "
    "unused); none: the method's own (sgd for reptile, adam for the others; for alpha-maml "
    "with beta fixed unless --beta_lr is given)",
    OUTER_OPTIMIZERS,
  )
  # hypergradient descent on the rates: the library's defaults (amaml.rates), the same in
  # every named config; None = the rule's default
  rate_rule: str = _field(
    "normalized", "how alpha and beta follow their hypergradients", RATE_RULES
  )
  alpha_lr: float | None = _field(None, "hypergradient rate of alpha (none: the rule's default)")
  beta_lr: float | None = _field(
    None,
    "hypergradient rate of beta (none: the rule's default; 0 for alpha-maml with its own "
    "outer optimizer)",
  )
  backtrack: bool = _field(
    True,
    "alpha-maml: halve alpha and hold the rest when adaptation more than doubles the query loss",
  )
  alpha_search: bool | None = _field(
    None,
    "before the first meta step, replace alpha0 by the smallest power of 4 (4^-6 to 4^6, "
    "whatever alpha0 is) that gets half of the largest query-loss decrease on the first "
    "meta-batch "
    "(amaml.rates.search_alpha); none: true for alpha-maml, false for the others",
  )
  alpha_min: float = _field(0.0, "lower bound on alpha")
  alpha_max: float | None = _field(None, "upper bound on alpha (none: unbounded)")
  beta_min: float = _field(0.0, "lower bound on beta")
  beta_max: float | None = _field(None, "upper bound on beta (none: unbounded)")
  # test-time adaptation
  test_adaptation: str = _field(
    "select",
    "select: inner steps (0..eval_inner_steps) and a "
    "multiple of alpha chosen on val_tasks validation tasks, each task keeping "
    "the inner iterate with the lowest support loss; fixed: "
    "eval_inner_steps steps at the trained alpha (MAML's protocol)",
    TEST_ADAPTATIONS,
  )
  eval_inner_steps: int = _field(10, "test-time inner steps (the most that select may choose)")
  # data
  protocol: str = _field(
    "maml",
    "Omniglot split: maml (1200 training characters, rotations "
    "as classes) or lake (background/evaluation alphabets)",
    PROTOCOLS,
  )
  image_size: int = _field(28, "image side in pixels (images are resized to it)")
  dataset: str = _field("", "task image_folder: the benchmark read from data_dir", DATASETS)
  data_dir: str = _field(
    "",
    "the data folder. omniglot: the arrays folder, which amaml download omniglot --data_dir "
    "writes (empty: $AMAML_OMNIGLOT_DIR, then shared/data/omniglot, then "
    "~/.cache/amaml/omniglot); image_folder: the benchmark's folder "
    "(empty: $AMAML_<DATASET>_DIR)",
  )
  track_pre_adaptation: bool = _field(
    True, "also log the query loss before adaptation (one more forward pass)"
  )
  # run
  iterations: int = _field(20000, "meta steps to train")
  max_minutes: float = _field(
    0.0, "stop (checkpoint, evaluate) after this much training; 0 = no limit"
  )
  seed: int = _field(0, "the one seed every random choice flows from")
  seeds: int = _field(
    1,
    "independent runs trained together as one vmapped program: seeds seed, seed+1, ..., "
    "each with its own weights, tasks and rates (amaml.seeds)",
  )
  log_every: int = _field(500, "meta steps between metric lines in metrics.jsonl")
  val_every: int = _field(
    5000, "meta steps between validations (0 = never; a multiple of log_every)"
  )
  val_tasks: int = _field(100, "meta-validation tasks per validation and for select")
  keep_best: bool = _field(
    False,
    "save the state whose validation was best (accuracy; sinusoid: loss) in <out>/best, "
    "validate the last state too, and test the best one at the end; with --seeds N each "
    "seed keeps and tests its own best (amaml.best)",
  )
  checkpoint_every: int = _field(
    5000, "meta steps between checkpoints (0 = only at the end; a multiple of log_every)"
  )
  eval_tasks: int = _field(
    600, "meta-test tasks of the final evaluation (and of amaml evaluate by default)"
  )
  eval_batch: int = _field(100, "tasks evaluated at once (lower it to save memory)")
  max_nonfinite: int = _field(50, "stop after this many consecutive non-finite steps")
  tensorboard: bool = _field(
    False,
    "also write every logged scalar as a TensorBoard event "
    "in <out>/tensorboard (pip install 'amaml[tensorboard]')",
  )
  # data parallelism (amaml.sharding): 1 = one device; 0 = all devices; n = the first n
  devices: int = _field(
    1,
    "devices to shard the meta-batch over: 1 = one, 0 = all, n = the first "
    "n; with several processes (--num_processes) all devices of them all",
  )

  def validate(self) -> "Config":
    """``self``, checked (:func:`amaml.config_checks.validate`); raises ``ValueError``
    naming the bad field and what it accepts."""
    return config_checks.validate(self)

  @property
  def resolved_outer_optimizer(self) -> str:
    """``outer_optimizer``, or the method's own when it is ``None``
    (``METHOD_OUTER_OPTIMIZER``: SGD for ``reptile``, else Adam)."""
    return self.outer_optimizer or METHOD_OUTER_OPTIMIZER[self.method]

  @property
  def resolved_beta_lr(self) -> float | None:
    """``beta_lr`` as the built learner reads it, for reports: when it is ``None``, ``0``
    (beta fixed) for ``alpha-maml`` with its own outer optimizer (:func:`amaml.alpha_maml`'s
    default, Adam at 1e-3), else ``None`` (the rule's default). A test checks it against
    the learner that :func:`amaml.train.build` makes."""
    if self.beta_lr is None and self.method == "alpha-maml" and self.outer_optimizer is None:
      return 0.0
    return self.beta_lr

  @property
  def resolved_alpha_search(self) -> bool:
    """``alpha_search``, or, when it is ``None``, whether the method is ``alpha-maml``."""
    return self.method == "alpha-maml" if self.alpha_search is None else self.alpha_search

  @property
  def resolved_beta(self) -> float:
    """``beta``, or :data:`DEFAULT_BETA` when it is ``None``."""
    return self.beta if self.beta is not None else DEFAULT_BETA

  @property
  def resolved_epsilon(self) -> float:
    """``epsilon`` (Reptile's outer step size at step 0), else ``beta``, its deprecated
    name for reptile (still read, e.g. from a ``config.json`` without ``epsilon``), else
    :data:`DEFAULT_EPSILON` with Reptile's SGD (:data:`DEFAULT_BETA` with another outer
    optimizer, e.g. Adam)."""
    for value in (self.epsilon, self.beta if self.method == "reptile" else None):
      if value is not None:
        return value
    return DEFAULT_EPSILON if self.resolved_outer_optimizer == "sgd" else DEFAULT_BETA

  @property
  def resolved_epsilon_schedule(self) -> str:
    """``epsilon_schedule``, or ``"linear"`` (the paper's) when it is ``None``."""
    return self.epsilon_schedule or "linear"

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    """The configuration in ``text`` (written by ``to_json``). A Reptile ``config.json``
    without ``epsilon_schedule`` is of a run that trained at a constant epsilon, and reads
    back so."""
    fields = json.loads(text)
    if fields.get("method") == "reptile" and "epsilon_schedule" not in fields:
      fields["epsilon_schedule"] = "constant"
    return cls(**fields)


# the schedule of every named image config: MAML's 60,000 meta steps; a log line every 100,
# a validation and a checkpoint every 1,000
_IMAGE_SCHEDULE = dict(
  iterations=60000,
  log_every=100,
  val_every=1000,
  checkpoint_every=1000,
  track_pre_adaptation=False,
)
# 5 query examples per class (the 5w1s meta-loss sees 32 x 25 query images a step): on the
# 2-core CPU a step with 15 queries per class takes 2.5x longer and, step for step, learns no
# faster (BENCHMARKS.md, "Omniglot accuracy"). Pass --queries 15 for the larger query set.
# The named configs set the problem (episodes, model, budget) and nothing about the rates:
# every one starts from the same untuned alpha0 = 0.1 and beta0 = 1e-3 and adapts them with
# the library's default rule (tests/test_tuning_free.py checks this). MAML's own tuned
# values (Finn et al. 2017: 5-way alpha 0.4, 20-way 0.1) are what `--method maml` needs:
# pass --alpha.
_OMNIGLOT = dict(
  _IMAGE_SCHEDULE, task="omniglot", hidden=64, meta_batch=32, queries=5, eval_batch=50
)
_IMAGENET = dict(
  _IMAGE_SCHEDULE,
  task="image_folder",
  ways=5,
  queries=15,
  image_size=84,
  hidden=32,
  inner_steps=5,
  eval_inner_steps=10,
  val_tasks=100,
  eval_tasks=600,
  eval_batch=25,
)
_CIFAR = {**_IMAGENET, "image_size": 32, "hidden": 64}
CONFIGS: dict[str, Config] = {
  # MAML's sinusoid regression: 10 support and 10 query points, MLP 1-40-40-1.
  "sinusoid": Config(),
  # MAML's Omniglot episodes (Finn et al. 2017): 5-way 1 step, 32 tasks; 20-way 5 steps,
  # 16 tasks; 60k iterations.
  "omniglot-5w1s": Config(**{**_OMNIGLOT, "ways": 5, "shots": 1}),
  "omniglot-5w5s": Config(**{**_OMNIGLOT, "ways": 5, "shots": 5}),
  "omniglot-20w1s": Config(
    **{**_OMNIGLOT, "ways": 20, "shots": 1, "inner_steps": 5, "meta_batch": 16}
  ),
  "omniglot-20w5s": Config(
    **{**_OMNIGLOT, "ways": 20, "shots": 5, "inner_steps": 5, "meta_batch": 16}
  ),
  # miniImageNet (Ravi & Larochelle splits) and tieredImageNet as in MAML (Finn et al.
  # 2017): 84x84 RGB, Conv4 with 32 filters, 15 queries per class, 5 inner steps in
  # training and 10 at test time, 4 tasks (1-shot) or 2 tasks (5-shot) per meta step.
  "miniimagenet-5w1s": Config(**_IMAGENET, dataset="miniimagenet", shots=1, meta_batch=4),
  "miniimagenet-5w5s": Config(**_IMAGENET, dataset="miniimagenet", shots=5, meta_batch=2),
  "tieredimagenet-5w1s": Config(**_IMAGENET, dataset="tieredimagenet", shots=1, meta_batch=4),
  "tieredimagenet-5w5s": Config(**_IMAGENET, dataset="tieredimagenet", shots=5, meta_batch=2),
  # CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): 32x32 RGB, the
  # same protocol with Conv4-64.
  "cifar-fs-5w1s": Config(**_CIFAR, dataset="cifar-fs", shots=1, meta_batch=4),
  "cifar-fs-5w5s": Config(**_CIFAR, dataset="cifar-fs", shots=5, meta_batch=2),
  "fc100-5w1s": Config(**_CIFAR, dataset="fc100", shots=1, meta_batch=4),
  "fc100-5w5s": Config(**_CIFAR, dataset="fc100", shots=5, meta_batch=2),
}


def get_config(name: str, **overrides: Any) -> Config:
  """A named configuration with fields overridden; validated. The fields that its method
  sets for itself (:data:`METHOD_DEFAULTS`) take the method's values unless overridden."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(Config)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown config field(s) {bad}; fields are {sorted(fields)}")
  base = dataclasses.replace(CONFIGS[name], **overrides)
  own = METHOD_DEFAULTS.get((base.method, base.task), {})
  return dataclasses.replace(
    base, **{k: v for k, v in own.items() if k not in overrides}
  ).validate()
