"""Named experiment configurations; every field can be overridden from the command line.

>>> cfg = get_config("omniglot-5w1s", alpha=0.4)
>>> cfg.ways, cfg.shots, cfg.meta_batch, cfg.alpha, cfg.rate_rule
(5, 1, 32, 0.4, 'normalized')
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

TASKS = ("sinusoid", "omniglot")
METHODS = ("alpha-maml", "alpha-maml-paper", "maml", "fomaml")
# the outer optimizer: Adam (its rate beta adapted by hypergradient for the Alpha MAML
# methods) or one of optax.contrib's learning-rate-free optimizers (beta then unused)
OUTER_OPTIMIZERS = ("adam", "prodigy", "dog", "mechanize", "cocob", "dadapt_adamw")
TEST_ADAPTATIONS = ("select", "fixed")


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run. Sinusoid uses ``shots``/``queries`` as points per task."""

  task: str = "sinusoid"
  method: str = "alpha-maml"
  # episodes
  ways: int = 1
  shots: int = 10
  queries: int = 10
  meta_batch: int = 25
  # model
  hidden: int = 40
  conv_impl: str = "auto"
  # inner loop
  inner_steps: int = 1
  unroll: bool = True  # unroll the inner loop (faster steps); False: a rolled lax.scan
  remat: bool = False  # recompute inner steps in the backward pass (rolled loop): less memory
  alpha: float = 0.1
  # outer loop
  beta: float = 1e-3
  outer_optimizer: str = "adam"
  # hypergradient descent on the rates: the library's defaults (amaml.rates), the same in
  # every named config; None = the rule's default hypergradient rate
  rate_rule: str = "normalized"
  alpha_lr: float | None = None
  beta_lr: float | None = None
  backtrack: bool = True  # alpha-maml: halve alpha, hold the rest, when adaptation hurts
  alpha_min: float = 0.0
  alpha_max: float | None = None
  beta_min: float = 0.0
  beta_max: float | None = None
  # test-time adaptation: "select" picks the inner steps (1..eval_inner_steps) and a
  # multiple of the trained alpha on val_tasks meta-validation tasks; "fixed" adapts
  # eval_inner_steps steps at the trained alpha (MAML's protocol)
  test_adaptation: str = "select"
  eval_inner_steps: int = 10
  # data
  protocol: str = "maml"
  image_size: int = 28
  data_dir: str = ""
  track_pre_adaptation: bool = True  # also log the query loss before adaptation (+1 forward)
  # run
  iterations: int = 20000
  max_minutes: float = 0.0  # stop (checkpoint, evaluate) after this much training; 0 = no limit
  seed: int = 0
  log_every: int = 500
  val_every: int = 5000
  val_tasks: int = 100
  checkpoint_every: int = 5000
  eval_tasks: int = 600
  eval_batch: int = 100
  max_nonfinite: int = 50
  # data parallelism (amaml.sharding): 1 = one device; 0 = all devices; n = the first n
  devices: int = 1

  def validate(self) -> "Config":
    """Raises ``ValueError`` naming the bad field and what it accepts."""
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r}: use one of {TASKS}")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}: use one of {METHODS}")
    if self.rate_rule not in ("additive", "log", "normalized"):
      raise ValueError(f"rate_rule={self.rate_rule!r}: use additive, log or normalized")
    if self.outer_optimizer not in OUTER_OPTIMIZERS:
      raise ValueError(f"outer_optimizer={self.outer_optimizer!r}: use one of {OUTER_OPTIMIZERS}")
    if self.test_adaptation not in TEST_ADAPTATIONS:
      raise ValueError(f"test_adaptation={self.test_adaptation!r}: use one of {TEST_ADAPTATIONS}")
    if self.protocol not in ("maml", "lake"):
      raise ValueError(f"protocol={self.protocol!r}: use maml or lake")
    for name in ("ways", "shots", "queries", "meta_batch", "inner_steps", "iterations",
                 "log_every", "val_tasks", "eval_tasks", "eval_batch", "max_nonfinite", "hidden"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.devices < 0:
      raise ValueError(f"devices={self.devices} must be >= 0 (0 = all devices, 1 = one device)")
    if self.max_minutes < 0:
      raise ValueError(f"max_minutes={self.max_minutes} must be >= 0 (0 = no time limit)")
    if self.eval_inner_steps < 0:
      raise ValueError(f"eval_inner_steps={self.eval_inner_steps} must be >= 0")
    for name in ("checkpoint_every", "val_every"):
      v = getattr(self, name)
      if v < 0 or (v and v % self.log_every):
        raise ValueError(f"{name}={v} must be 0 (never) or a multiple of log_every={self.log_every}")
    if self.alpha < 0 or self.beta <= 0:
      raise ValueError(f"alpha={self.alpha} must be >= 0 and beta={self.beta} > 0")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    return cls(**json.loads(text))


# 5 query examples per class (the 5w1s meta-loss sees 32 x 25 query images a step): on the
# 2-core CPU a step with 15 queries per class takes 2.5x longer and, step for step, learns no
# faster (BENCHMARKS.md, "Omniglot accuracy"). Pass --queries 15 for the larger query set.
# The named configs set the problem (episodes, model, budget) and nothing about the rates:
# every one starts from the same untuned alpha0 = 0.1 and beta0 = 1e-3 and adapts them with
# the library's default rule (tests/test_tuning_free.py checks this). MAML's own tuned
# values (Finn et al. 2017: 5-way alpha 0.4, 20-way 0.1) are what `--method maml` needs:
# pass --alpha.
_OMNIGLOT = dict(task="omniglot", hidden=64, meta_batch=32, queries=5, iterations=60000,
                 log_every=100, val_every=1000, checkpoint_every=1000, eval_batch=50,
                 track_pre_adaptation=False)
CONFIGS: dict[str, Config] = {
    # MAML's sinusoid regression: 10 support and 10 query points, MLP 1-40-40-1.
    "sinusoid": Config(),
    # MAML's Omniglot episodes (Finn et al. 2017): 5-way 1 step, 32 tasks; 20-way 5 steps,
    # 16 tasks; 60k iterations.
    "omniglot-5w1s": Config(**{**_OMNIGLOT, "ways": 5, "shots": 1}),
    "omniglot-5w5s": Config(**{**_OMNIGLOT, "ways": 5, "shots": 5}),
    "omniglot-20w1s": Config(**{**_OMNIGLOT, "ways": 20, "shots": 1, "inner_steps": 5,
                                "meta_batch": 16}),
    "omniglot-20w5s": Config(**{**_OMNIGLOT, "ways": 20, "shots": 5, "inner_steps": 5,
                                "meta_batch": 16}),
}


def get_config(name: str, **overrides: Any) -> Config:
  """A named configuration with fields overridden; validated."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(Config)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown config field(s) {bad}; fields are {sorted(fields)}")
  return dataclasses.replace(CONFIGS[name], **overrides).validate()
