"""What a configuration builds: the task, the model, the learner, and a run's random keys.

:func:`build` turns a :class:`~amaml.configs.Config` into an :class:`Experiment`: its task
family's setup from :data:`TASKS` (model, initial parameters, loss, data and an on-device
task sampler, :class:`TaskSetup`) and the :class:`~amaml.meta.MetaLearner` of its method
(:func:`make_learner`). Every random key of a run derives from its seed in :func:`run_keys`.
A new task family is one setup function here and its name in ``amaml.configs.TASKS``.

(:mod:`amaml.train` re-exports the names here that it held before, so ``amaml.train.build``
works too.)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from amaml import losses, meta, methods, validate
from amaml.defaults import BY_METHOD
from amaml.configs import Config
from amaml.imaml import imaml
from amaml.task import TaskBatch


class Experiment(NamedTuple):
  """What a configuration builds: the learner, initial parameters and task samplers."""

  config: Config
  learner: meta.MetaLearner
  params: Any
  data: dict  # split name -> device array of images (or None for sinusoid)
  sample: Callable[[jax.Array, Any, int], TaskBatch]  # (key, split data, num_tasks) -> batch
  # init key -> the model's initial parameters (another seed's weights without loading data)
  init_params: Callable[[jax.Array], Any] | None = None


class TaskSetup(NamedTuple):
  """What a task family gives :func:`build`."""

  params: Any  # initial parameters of its model
  loss_fn: Callable  # (params, x, y) -> (loss, aux)
  data: dict  # split name -> device array of images (or None)
  sample: Callable[[jax.Array, Any, int], TaskBatch]  # (key, split data, num_tasks) -> batch
  check: Callable[[TaskBatch, Any], None]  # (a batch, its split's data): raises on bad data
  embed_fn: Callable | None = None  # (params, x) -> features, for metric methods (protonet)
  # init key -> the model's initial parameters (``params`` is those of the run's init key);
  # without it, another seed's weights take a whole setup (:func:`amaml.seeds.initial_params`)
  init_params: Callable[[jax.Array], Any] | None = None


class RunKeys(NamedTuple):
  """The random keys of a run, all derived from ``cfg.seed`` here and nowhere else."""

  init: jax.Array  # the model's initial weights
  train: jax.Array  # meta step i samples its tasks with fold_in(train, i)
  eval: jax.Array  # split s, batch b of an evaluation: fold_in(fold_in(eval, s), b)


def run_keys(cfg: Config | int | jax.Array) -> RunKeys:
  """The keys of ``cfg``'s run, or of the run with this seed (see :class:`RunKeys`); a
  traced seed works too (a vmap over seeds)."""
  root = jax.random.key(cfg.seed if isinstance(cfg, Config) else cfg)
  return RunKeys(*(jax.random.fold_in(root, i) for i in range(3)))


def sinusoid_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """MAML's sinusoid regression: an MLP, mean squared error, tasks drawn on the device."""
  from amaml.models import MLP
  from amaml.sinusoid import sinusoid_tasks

  model = MLP(hidden=(cfg.hidden, cfg.hidden), out=1)
  init_params = lambda k: model.init(k, jnp.zeros((1, 1), jnp.float32))["params"]
  params = init_params(key)
  loss_fn = losses.mse(lambda p, x: model.apply({"params": p}, x))

  def sample(k, _, n):
    return sinusoid_tasks(k, n, num_support=cfg.shots, num_query=cfg.queries)

  if cfg.method == "protonet":
    raise ValueError(
      "method protonet needs a classification task (omniglot or image_folder), "
      "not sinusoid regression"
    )
  return TaskSetup(
    params,
    loss_fn,
    {"train": None, "val": None, "test": None},
    sample,
    lambda batch, _: validate.check_regression_batch(batch),
    init_params=init_params,
  )


def omniglot_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """Omniglot N-way K-shot (``cfg.protocol``'s split): ``cfg.model``, cross-entropy."""
  from amaml.data import load_omniglot

  splits = load_omniglot(cfg.protocol, image_size=cfg.image_size, data_dir=cfg.data_dir or None)
  return classification_setup(
    cfg, key, {name: getattr(splits, name) for name in ("train", "val", "test")}
  )


def image_folder_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """A few-shot image benchmark (``cfg.dataset``) read from ``cfg.data_dir``: ``cfg.model``."""
  from amaml.data.image_folders import load_image_benchmark

  return classification_setup(
    cfg, key, load_image_benchmark(cfg.dataset, cfg.data_dir or None, image_size=cfg.image_size)
  )


def classification_setup(cfg: Config, key: jax.Array, splits: dict) -> TaskSetup:
  """N-way K-shot classification of ``{split: ClassImages or None}``: the images go to the
  device, episodes are sampled there, the model is ``cfg.model`` (Conv4 or ResNet-12) and
  the loss cross-entropy."""
  from amaml.data import sample_tasks

  data = {name: jnp.asarray(src.images) for name, src in splits.items() if src is not None}
  for name, images in data.items():
    if cfg.ways > images.shape[0]:
      raise ValueError(
        f"ways={cfg.ways} is more than the {images.shape[0]} classes of the "
        f"{name} split; lower --ways"
      )
    if cfg.shots + cfg.queries > images.shape[1]:
      raise ValueError(
        f"shots + queries = {cfg.shots + cfg.queries} is more than the "
        f"{images.shape[1]} examples per class; lower --shots or --queries"
      )
  # ProtoNets: the same network without its head, an embedding
  model = image_model(cfg, num_classes=0 if cfg.method == "protonet" else cfg.ways)
  shape = data["train"].shape[2:]
  init_params = lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32))["params"]
  params = init_params(key)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  loss_fn = losses.cross_entropy(apply_fn)

  def sample(k, images, n):
    return sample_tasks(k, images, cfg.ways, cfg.shots, cfg.queries, n)

  def check(batch, images):
    validate.check_classification_batch(batch, cfg.ways, tuple(images.shape[2:]))

  return TaskSetup(params, loss_fn, data, sample, check, apply_fn, init_params)


def image_model(cfg: Config, num_classes: int):
  """The Flax network ``cfg.model`` of the image tasks with ``num_classes`` logits (0: no
  head, an embedding): ``Conv4`` with ``cfg.hidden`` filters or ``ResNet12``."""
  from amaml.models import Conv4, ResNet12

  if cfg.model == "resnet12":
    return ResNet12(num_classes=num_classes, conv_impl=cfg.conv_impl)
  return Conv4(num_classes=num_classes, hidden=cfg.hidden, conv_impl=cfg.conv_impl)


# Config.task -> its setup. A new task family is one function here and its name in
# amaml.configs.TASKS.
TASKS: dict[str, Callable[[Config, jax.Array], TaskSetup]] = {
  "sinusoid": sinusoid_setup,
  "omniglot": omniglot_setup,
  "image_folder": image_folder_setup,
}


def build(cfg: Config) -> Experiment:
  """Model, loss, learner and data for ``cfg`` (its task's setup from :data:`TASKS`)."""
  cfg.validate()
  setup = TASKS[cfg.task](cfg, run_keys(cfg).init)
  learner = make_learner(cfg, setup.loss_fn, setup.embed_fn)
  # one batch of each split, checked on the host before anything is compiled for them
  for images in setup.data.values():
    setup.check(setup.sample(jax.random.key(0), images, 2), images)
  return Experiment(cfg, learner, setup.params, setup.data, setup.sample, setup.init_params)


def outer_optimizer(name: str):
  """The outer optimizer: ``optax.adam`` (a factory, wrapped in :func:`amaml.hypergradient`
  so that ``beta`` can adapt) or a built learning-rate-free optimizer of ``optax.contrib``."""
  import optax

  if name in ("adam", "sgd"):
    return getattr(optax, name)
  if name == "mechanize":
    return optax.contrib.mechanize(optax.adam(1.0))
  return getattr(optax.contrib, name)()


def _fixed_rate_outer_optimizer(cfg: Config, rate=None):
  """The built outer optimizer of a method that does not adapt its rate (reptile, protonet):
  a factory (adam, sgd) at ``rate`` (a number or an Optax schedule; default
  ``cfg.resolved_beta``), or a learning-rate-free one as it is."""
  outer = outer_optimizer(cfg.resolved_outer_optimizer)
  return outer if hasattr(outer, "update") else outer(cfg.resolved_beta if rate is None else rate)


def make_learner(cfg: Config, loss_fn, embed_fn=None) -> meta.MetaLearner:
  """The :class:`~amaml.meta.MetaLearner` of ``cfg.method`` for ``loss_fn`` (``embed_fn``:
  the embedding that protonet compares)."""
  if cfg.method == "imaml":
    return imaml(
      loss_fn,
      lam=cfg.imaml_lambda,
      alpha=cfg.alpha,
      inner_steps=cfg.inner_steps,
      cg_steps=cfg.cg_steps,
      optimizer=_fixed_rate_outer_optimizer(cfg),
      inner_optimizer=cfg.inner_optimizer,
      track_pre_adaptation=cfg.track_pre_adaptation,
    )
  if cfg.method == "protonet":
    return methods.protonet(embed_fn, ways=cfg.ways, optimizer=_fixed_rate_outer_optimizer(cfg))
  if cfg.method == "reptile":
    return _reptile(cfg, loss_fn)
  if cfg.method == "maml++":
    return methods.maml_plus_plus(
      loss_fn,
      **{
        **_maml_kwargs(cfg),
        "alpha_min": None,
        "alpha_max": cfg.alpha_max,
        "multi_step_loss": cfg.multi_step_loss or BY_METHOD["maml++"]["multi_step_loss"],
        "first_order_steps": cfg.first_order_steps or BY_METHOD["maml++"]["first_order_steps"],
      },
    )
  return _maml_family(cfg, loss_fn)


def _reptile(cfg: Config, loss_fn) -> meta.MetaLearner:
  """Reptile: its own SGD logs epsilon; another outer optimizer takes it as its rate."""
  epsilon = methods.epsilon_schedule(
    cfg.resolved_epsilon, cfg.iterations, cfg.resolved_epsilon_schedule
  )
  own = cfg.resolved_outer_optimizer == "sgd"
  return methods.reptile(
    loss_fn,
    alpha=cfg.alpha,
    inner_steps=cfg.inner_steps,
    epsilon=epsilon,
    optimizer=None if own else _fixed_rate_outer_optimizer(cfg, epsilon),
    track_pre_adaptation=cfg.track_pre_adaptation,
    inner_params=cfg.inner_params or None,
    inner_optimizer=cfg.inner_optimizer,
  )


def _maml_kwargs(cfg: Config) -> dict:
  """The options that every method of the MAML family takes from ``cfg`` (MAML++'s own
  defaults where a field says none)."""
  plus = cfg.method == "maml++"
  per_step = (
    cfg.per_step_params if cfg.per_step_params is not None else (_norms(cfg) if plus else None)
  )
  # the method's own outer optimizer (outer_optimizer None) is the one its factory defaults to
  own = {} if cfg.outer_optimizer is None else {"optimizer": outer_optimizer(cfg.outer_optimizer)}
  return dict(
    **own,
    alpha=cfg.alpha,
    beta=cfg.resolved_beta,
    inner_steps=cfg.inner_steps,
    track_pre_adaptation=cfg.track_pre_adaptation,
    remat=cfg.remat,
    unroll=True if cfg.unroll else 1,
    tasks_at_once=cfg.tasks_at_once,
    alpha_min=cfg.alpha_min,
    alpha_max=cfg.alpha_max,
    beta_min=cfg.beta_min,
    beta_max=cfg.beta_max,
    inner_optimizer=cfg.inner_optimizer,
    alpha_per_step=plus if cfg.alpha_per_step is None else cfg.alpha_per_step,
    per_step_params=per_step or None,
  )


def _maml_family(cfg: Config, loss_fn) -> meta.MetaLearner:
  """alpha-maml, alpha-maml-paper, meta-sgd, anil, maml and fomaml."""
  kwargs = _maml_kwargs(cfg)
  kwargs.update(multi_step_loss=cfg.multi_step_loss, first_order_steps=cfg.first_order_steps)
  if cfg.alpha_granularity is not None:  # validate() allows it for alpha-maml(-paper) only
    kwargs.update(alpha_granularity=cfg.alpha_granularity)
  rates = dict(alpha_lr=cfg.alpha_lr, beta_lr=cfg.beta_lr)
  if cfg.method == "alpha-maml":
    return methods.alpha_maml(
      loss_fn, rate_rule=cfg.rate_rule, backtrack=cfg.backtrack, **rates, **kwargs
    )
  if cfg.method == "alpha-maml-paper":
    return methods.alpha_maml_paper(loss_fn, **rates, **kwargs)
  if cfg.method == "meta-sgd":
    return methods.meta_sgd(loss_fn, **{**kwargs, "alpha_min": None, "alpha_max": cfg.alpha_max})
  if cfg.method == "anil":
    return methods.anil(loss_fn, inner_params=cfg.inner_params or HEADS[cfg.task], **kwargs)
  return methods.maml(
    loss_fn, first_order=cfg.method == "fomaml", inner_params=cfg.inner_params or None, **kwargs
  )


#: The model head of each task's model: what ANIL adapts unless ``--inner_params`` says
#: otherwise.
HEADS = {"sinusoid": "^Dense_2/", "omniglot": "^head/", "image_folder": "^head/"}
#: The batch-norm parameters of each task's model: what maml++ keeps one copy of per inner
#: step.
NORMS = {"omniglot": "^norm", "image_folder": "^norm"}
#: The batch norms of a model that keeps them elsewhere than :data:`NORMS` says: ResNet-12's
#: are in its blocks (``block0/norm0/scale``, ``block3/norm_shortcut/bias``).
MODEL_NORMS = {"resnet12": r"^block\d+/norm"}


def _norms(cfg: Config) -> str | None:
  """The batch-norm pattern of ``cfg``'s model (:data:`MODEL_NORMS`, else :data:`NORMS`)."""
  if cfg.task in NORMS and cfg.model in MODEL_NORMS:
    return MODEL_NORMS[cfg.model]
  return NORMS.get(cfg.task)
