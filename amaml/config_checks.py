"""What a :class:`~amaml.configs.Config` may hold: the values of its choice fields, and the
checks of a whole configuration (:func:`validate`), grouped by concern.

Every check raises ``ValueError`` naming the field (or flag) and what it accepts.

>>> from amaml.configs import Config
>>> validate(Config(meta_batch=0))
Traceback (most recent call last):
ValueError: meta_batch=0 must be >= 1
"""

from __future__ import annotations

TASKS = ("sinusoid", "omniglot", "image_folder")
# the image benchmarks of task image_folder (amaml.data.image_folders.DATASETS)
DATASETS = ("", "miniimagenet", "tieredimagenet", "cifar-fs", "fc100")
METHODS = (
  "alpha-maml",
  "alpha-maml-paper",
  "maml",
  "fomaml",
  "meta-sgd",
  "anil",
  "maml++",
  "reptile",
  "protonet",
  "imaml",
)
# the outer optimizer: Adam (its rate beta adapted by hypergradient for the Alpha MAML
# methods), SGD, or one of optax.contrib's learning-rate-free optimizers (beta then unused)
OUTER_OPTIMIZERS = ("adam", "sgd", "prodigy", "dog", "mechanize", "cocob", "dadapt_adamw")
EPSILON_SCHEDULES = ("constant", "linear")
TEST_ADAPTATIONS = ("select", "fixed")
# the network of the image tasks (omniglot, image_folder); sinusoid always uses its MLP
MODELS = ("conv4", "resnet12")
RATE_RULES = ("additive", "log", "normalized")
PROTOCOLS = ("maml", "lake")

# the choice fields and their values; None is allowed for those of _OPTIONAL_CHOICES
_CHOICES = {
  "task": TASKS,
  "method": METHODS,
  "rate_rule": RATE_RULES,
  "outer_optimizer": OUTER_OPTIMIZERS,
  "epsilon_schedule": EPSILON_SCHEDULES,
  "test_adaptation": TEST_ADAPTATIONS,
  "model": MODELS,
  "dataset": DATASETS,
  "protocol": PROTOCOLS,
}
_OPTIONAL_CHOICES = ("outer_optimizer", "epsilon_schedule")
# the fields that count something: at least 1
_COUNTS = (
  "ways",
  "shots",
  "queries",
  "meta_batch",
  "inner_steps",
  "iterations",
  "log_every",
  "val_tasks",
  "eval_tasks",
  "eval_batch",
  "max_nonfinite",
  "hidden",
  "seeds",
)


def validate(cfg):
  """``cfg``, checked; raises ``ValueError`` naming the bad field and what it accepts."""
  check_choices(cfg)
  check_numbers(cfg)
  check_method_options(cfg)
  check_epsilon(cfg)
  check_seeds(cfg)
  check_keep_best(cfg)
  return cfg


def check_choices(cfg) -> None:
  """The choice fields, and the task's pairing with ``model`` and ``dataset``."""
  for name, choices in _CHOICES.items():
    value = getattr(cfg, name)
    if value not in choices and not (value is None and name in _OPTIONAL_CHOICES):
      shown = tuple(c for c in choices if c)  # dataset "" is no benchmark
      raise ValueError(f"{name}={value!r}: use one of {shown}")
  if cfg.model != "conv4" and cfg.task == "sinusoid":
    raise ValueError(
      f"--model {cfg.model} is for the image tasks (omniglot, image_folder); "
      "sinusoid always uses its MLP: drop --model"
    )
  if (cfg.task == "image_folder") != bool(cfg.dataset):
    raise ValueError(
      f"task={cfg.task!r} with dataset={cfg.dataset!r}: task image_folder "
      "needs a dataset, the other tasks take none"
    )


def check_numbers(cfg) -> None:
  """Counts, rates, schedules and budgets: in range, and the periods multiples of
  ``log_every``."""
  for name in _COUNTS:
    if getattr(cfg, name) < 1:
      raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
  if cfg.devices < 0:
    raise ValueError(f"devices={cfg.devices} must be >= 0 (0 = all devices, 1 = one device)")
  if cfg.imaml_lambda <= 0 or cfg.cg_steps < 1:
    raise ValueError(
      f"imaml_lambda={cfg.imaml_lambda} must be > 0 and cg_steps={cfg.cg_steps} >= 1"
    )
  if cfg.multi_step_loss < 0 or cfg.first_order_steps < 0:
    raise ValueError("multi_step_loss and first_order_steps must be >= 0 (0 = off)")
  if cfg.max_minutes < 0:
    raise ValueError(f"max_minutes={cfg.max_minutes} must be >= 0 (0 = no time limit)")
  if cfg.tasks_at_once is not None and cfg.tasks_at_once < 0:
    raise ValueError(f"tasks_at_once={cfg.tasks_at_once} must be >= 0 (0 = all tasks at once)")
  if cfg.eval_inner_steps < 0:
    raise ValueError(f"eval_inner_steps={cfg.eval_inner_steps} must be >= 0")
  for name in ("checkpoint_every", "val_every"):
    v = getattr(cfg, name)
    if v < 0 or (v and v % cfg.log_every):
      raise ValueError(f"{name}={v} must be 0 (never) or a multiple of log_every={cfg.log_every}")
  if cfg.alpha < 0 or (cfg.beta is not None and cfg.beta <= 0):
    raise ValueError(f"alpha={cfg.alpha} must be >= 0 and beta={cfg.beta} > 0")


def check_method_options(cfg) -> None:
  """The options that only some methods have."""
  if cfg.method in ("reptile", "protonet") and (cfg.alpha_per_step or cfg.per_step_params):
    raise ValueError(
      f"method={cfg.method!r} has no per-step rates or parameters: drop "
      "--alpha_per_step and --per_step_params"
    )
  if cfg.alpha_search and cfg.method in ("reptile", "protonet"):
    raise ValueError(
      f"method={cfg.method!r} has no meta-loss through an inner rate to search: drop --alpha_search"
    )
  if cfg.alpha_granularity is not None and cfg.method not in ("alpha-maml", "alpha-maml-paper"):
    raise ValueError(
      f"method={cfg.method!r} sets its own rates: --alpha_granularity is "
      "for alpha-maml and alpha-maml-paper only"
    )
  if cfg.tasks_at_once is not None and cfg.method in ("reptile", "protonet", "imaml"):
    raise ValueError(
      f"method={cfg.method!r} runs its tasks all at once: --tasks_at_once is for the "
      "MAML family (alpha-maml, maml, fomaml, anil, meta-sgd, maml++)"
    )
  if cfg.method == "imaml" and (cfg.inner_params or cfg.alpha_per_step or cfg.per_step_params):
    raise ValueError(
      "method='imaml' adapts every parameter at one alpha: drop --inner_params, "
      "--alpha_per_step and --per_step_params"
    )


def check_epsilon(cfg) -> None:
  """Reptile's ``epsilon`` and ``epsilon_schedule``: its own, positive, one name."""
  given = [f"--{n}" for n in ("epsilon", "epsilon_schedule") if getattr(cfg, n) is not None]
  if given and cfg.method != "reptile":
    raise ValueError(
      f"{' and '.join(given)} set Reptile's outer step: method "
      f"{cfg.method!r} takes --beta instead (or pass --method reptile)"
    )
  if cfg.epsilon is not None and cfg.epsilon <= 0:
    raise ValueError(f"epsilon={cfg.epsilon} must be > 0")
  if cfg.method == "reptile" and cfg.epsilon is not None and cfg.beta is not None:
    raise ValueError(
      f"epsilon={cfg.epsilon} and beta={cfg.beta}: for reptile --beta is "
      "the old name of --epsilon; pass --epsilon alone"
    )


def check_seeds(cfg) -> None:
  """``seeds`` > 1 (one vmapped program, :mod:`amaml.seeds`) with what it supports."""
  if cfg.seeds > 1 and cfg.devices != 1:
    raise ValueError(
      f"--seeds {cfg.seeds} with --devices {cfg.devices}: several seeds train on one device; "
      "pass --devices 1, or --seeds 1 to split one run over devices"
    )


def check_keep_best(cfg) -> None:
  """``keep_best`` (:mod:`amaml.best`) needs validations: a period and a val split (with
  ``seeds`` > 1 each seed keeps its own best)."""
  if not cfg.keep_best:
    return
  if cfg.val_every == 0:
    raise ValueError(
      "--keep_best with --val_every 0: the best parameters are chosen on validations; pass "
      f"--val_every N (a multiple of --log_every {cfg.log_every}) or drop --keep_best"
    )
  if cfg.task == "omniglot" and cfg.protocol == "lake":
    raise ValueError(
      "--keep_best with --protocol lake: that Omniglot split has no validation tasks to "
      "choose on; use --protocol maml or drop --keep_best"
    )
