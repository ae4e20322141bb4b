"""The flags of every ``amaml`` subcommand (:mod:`amaml.cli` runs them).

One name per concept: ``--out`` is always a run directory (``train``, ``reproduce``),
``--data_dir`` the data folder (``train``, ``reproduce``, ``download``: the folder that
``train`` reads), and ``evaluate`` takes ``--eval_tasks`` and ``--eval_inner_steps``, the
names of the :class:`~amaml.configs.Config` fields it overrides. A flag of
:data:`RENAMED_FLAGS` that a user types is answered by one line naming its new name.

>>> args = parser().parse_args(["evaluate", "--run", "r", "--eval_inner_steps", "3"])
>>> args.eval_inner_steps, args.eval_tasks
(3, None)
"""

from __future__ import annotations

import argparse
import dataclasses

from amaml.configs import CONFIGS, Config

#: ``{subcommand: {old flag: new flag}}``: flags with a new name, refused with one line
#: (:class:`RenamedFlag`) that names the new one.
RENAMED_FLAGS = {
  "evaluate": {"--tasks": "--eval_tasks", "--inner_steps": "--eval_inner_steps"},
  "plot": {"--out": "--plot_dir"},
  "download": {"--out": "--data_dir"},
}


class RenamedFlag(ValueError):
  """A flag of :data:`RENAMED_FLAGS` on the command line: ``command`` is the subcommand."""

  def __init__(self, command: str, message: str):
    super().__init__(message)
    self.command = command


class _Renamed(argparse.Action):
  """An old flag, hidden from ``--help``: raises :class:`RenamedFlag` naming the new one."""

  def __init__(self, option_strings, dest, command: str, new: str, **kwargs):
    super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
    self.command, self.new = command, new

  def __call__(self, parser, namespace, values, option_string=None):
    fix = f"pass {self.new} {values}" if values is not None else f"pass {self.new}"
    raise RenamedFlag(self.command, f"{option_string} was renamed {self.new}: {fix}")


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_help(name: str) -> str:
  """The help text of the :class:`~amaml.configs.Config` field ``name``."""
  return next(f for f in dataclasses.fields(Config) if f.name == name).metadata["help"]


def parser():
  """The ``amaml`` command line, an ``argparse.ArgumentParser`` with one subparser per
  subcommand."""
  ap = argparse.ArgumentParser(prog="amaml", description="Alpha MAML in JAX")
  sub = ap.add_subparsers(dest="command", required=True)
  for add in (_train_flags, _evaluate_flags, _plot_flags, _download_flags, _reproduce_flags):
    add(sub)
  for command, renames in RENAMED_FLAGS.items():
    for old, new in renames.items():
      sub.choices[command].add_argument(old, action=_Renamed, command=command, new=new)
  return ap


def _train_flags(sub) -> None:
  tr = sub.add_parser("train", help="meta-train, then evaluate on the meta-test split")
  tr.add_argument(
    "--config",
    default="sinusoid",
    choices=sorted(CONFIGS),
    help="the named configuration to start from (amaml.configs.CONFIGS) [default: sinusoid]",
  )
  tr.add_argument("--out", default=None, help="run directory (default runs/<config>-<method>)")
  tr.add_argument("--resume", action="store_true", help="continue the run in --out")
  tr.add_argument("--no_progress", action="store_true", help="no progress bar")
  _process_flags(tr)
  _config_flags(tr)


# amaml train's flags for several processes: (flag, type, default, metavar, help)
_PROCESS_FLAGS = (
  ("num_processes", int, 1, "N", "processes in all [default: 1]"),
  ("process_id", int, 0, "I", "this process: 0 .. num_processes-1 [default: 0]"),
  (
    "coordinator_address",
    str,
    None,
    "HOST:PORT",
    "where process 0 listens, the same in every process (e.g. host0:1234)",
  ),
  (
    "heartbeat_timeout",
    int,
    100,
    "SECONDS",
    "a process silent this long stops the others [default: 100]",
  ),
)


def _process_flags(tr) -> None:
  group = tr.add_argument_group(
    "several processes",
    "run the same command in every process (one per host, or several "
    "on one machine), each with its --process_id; the meta-batch is split over the devices of "
    "all of them and process 0 writes the run directory, which every process must see",
  )
  for name, typ, default, metavar, help in _PROCESS_FLAGS:
    group.add_argument(f"--{name}", type=typ, default=default, metavar=metavar, help=help)


def _config_flags(tr) -> None:
  """One flag per :class:`~amaml.configs.Config` field, its help the field's."""
  group = tr.add_argument_group(
    "configuration fields",
    "each flag overrides one field of the named --config; a field "
    "the config does not set has the default shown",
  )
  for f in dataclasses.fields(Config):
    name = (f.type if isinstance(f.type, str) else f.type.__name__).removesuffix(" | None")
    choices = f.metadata.get("choices")
    default = (
      "none" if f.default is None else str(f.default).lower() if name == "bool" else f.default
    )
    group.add_argument(
      f"--{f.name}",
      type={"int": int, "float": float, "str": str, "bool": _bool}[name],
      default=None,
      nargs="?" if name == "bool" else None,  # a bool flag alone: true (--keep_best)
      const=True if name == "bool" else None,
      choices=choices,
      metavar=name.upper() if choices is None else None,
      help=f"{f.metadata.get('help', '')} [default: {default!s}]",
    )


def _evaluate_flags(sub) -> None:
  ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint on meta-test tasks")
  ev.add_argument(
    "--run",
    required=True,
    nargs="+",
    help="run directories written by amaml train (several: a comparison table)",
  )
  ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ev.add_argument("--split", default="test", choices=["train", "val", "test"])
  ev.add_argument(
    "--eval_tasks",
    type=int,
    default=None,
    metavar="N",
    help="number of tasks (default: the run's eval_tasks)",
  )
  ev.add_argument(
    "--eval_inner_steps",
    type=int,
    default=None,
    metavar="N",
    help="test-time inner steps at the trained alpha (default: the run's "
    "test_adaptation, chosen on validation tasks unless it is 'fixed')",
  )


def _plot_flags(sub) -> None:
  pl = sub.add_parser("plot", help="PNG learning curves and alpha/beta trajectories of runs")
  pl.add_argument("--run", required=True, nargs="+", help="run directories")
  pl.add_argument(
    "--plot_dir", default=None, help="folder the PNG files go to (default: the first run)"
  )


def _download_flags(sub) -> None:
  dl = sub.add_parser(
    "download",
    help="fetch a data set (the official zips, SHA-256 checked) and write the folder amaml reads",
  )
  dl.add_argument("dataset", choices=["omniglot"])
  dl.add_argument(
    "--data_dir",
    default=None,
    help="the arrays folder to write, which amaml train --data_dir reads (default "
    "~/.cache/amaml/omniglot, where amaml train looks for it without --data_dir)",
  )
  dl.add_argument(
    "--url",
    default=None,
    help="where the zips are (default: the data set's GitHub repository; file:// URLs work too)",
  )
  dl.add_argument("--no_progress", action="store_true", help="no progress bar")


def _reproduce_flags(sub) -> None:
  """``amaml reproduce``'s flags (:mod:`amaml.reproduce`)."""
  from amaml import reproduce

  rp = sub.add_parser(
    "reproduce",
    help="reproduce a published table: amaml's default, MAML and MAML++ at the papers' "
    "schedules against the published accuracies",
    description="Trains and evaluates amaml's default (alpha-maml), MAML and MAML++ on "
    "every setting at its paper's schedule, one run after another (seeds too: no vmapped "
    "multi-seed run yet), and writes the table against the published numbers to stdout, "
    "OUT/reproduce.md and OUT/reproduce.jsonl. Running it again skips finished runs and "
    "resumes the others. The full schedules take days on a CPU: they are meant for a GPU.",
  )
  rp.add_argument("benchmark", choices=["omniglot"], help="the published table")
  for flag, choices in (("settings", reproduce.SETTINGS), ("methods", reproduce.METHODS)):
    rp.add_argument(
      f"--{flag}",
      nargs="+",
      default=list(choices),
      metavar=flag[:-1].upper(),
      help=f"a subset of {' '.join(choices)} [default: all]",
    )
  for flag, typ, default, metavar, help in _REPRODUCE_FLAGS:
    rp.add_argument(f"--{flag}", type=typ, default=default, metavar=metavar, help=help)
  rp.add_argument("--no_progress", action="store_true", help="no progress bar")


# amaml reproduce's flags after --settings and --methods: (flag, type, default, metavar, help)
_REPRODUCE_FLAGS = (
  (
    "seeds",
    int,
    1,
    "N",
    "seeds 0..N-1 per setting and method, run one after another (no vmapped "
    "multi-seed run yet) [default: 1]",
  ),
  (
    "budget",
    float,
    1.0,
    "F",
    "scale every schedule (meta steps, MAML++'s annealing) by F in (0, 1], e.g. 0.001 "
    "for a CPU smoke run [default: 1, the papers' schedules: days on a CPU, meant for a GPU]",
  ),
  (
    "out",
    str,
    "runs/reproduce-omniglot",
    None,
    "run directory, one subdirectory per run (<setting>/<method>/seed<k>); a re-run "
    "skips finished runs and resumes the others [default: runs/reproduce-omniglot]",
  ),
  ("data_dir", str, None, None, _field_help("data_dir")),
  (
    "eval_tasks",
    int,
    None,
    "N",
    "meta-test tasks per run, and at most N validation tasks for the test-time choice "
    "(evaluation is not scaled by --budget) [default: each config's, 600 and 100]",
  ),
)
