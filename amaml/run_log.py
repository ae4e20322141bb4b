"""What a training run reports while it runs: ``metrics.jsonl``, TensorBoard, a progress bar.

Every ``log_every`` steps :func:`amaml.train.train` writes one line (:func:`log_line`: the
means of the steps since the last line, the rates at their end, by
:data:`amaml.meta.METRIC_REDUCTIONS`) through a :class:`RunLog`: to ``metrics.jsonl``, to
TensorBoard's scalars under the same names (``--tensorboard``) and to the progress bar's
fields. A resumed run first drops the lines past its checkpoint (:func:`truncate_metrics`).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import numpy as np

from amaml import meta
from amaml.configs import Config


def summarise(ms: dict) -> dict:
  """One log line from metrics stacked over its steps (:data:`amaml.meta.METRIC_REDUCTIONS`)."""
  out = {}
  for k, v in ms.items():
    v = np.asarray(v)
    how = meta.METRIC_REDUCTIONS.get(k, "mean")
    if how == "last":
      out[k] = float(v[-1])
    elif how == "sum":
      out[f"{k}_steps"] = int(v.sum())
    else:
      finite = v[np.isfinite(v)]
      out[k] = float(finite.mean()) if finite.size else float("nan")
  return out


def log_line(step: int, pending: list, t_line: float) -> dict:
  """The log line at ``step`` of the metrics of the calls since the last one (``pending``,
  each stacked over its steps), and their steps per second since ``t_line``
  (``time.perf_counter()``)."""
  stacked = jax.device_get(jax.tree.map(lambda *x: np.concatenate(x), *pending))
  steps_in_line = len(stacked["loss"])
  return {
    "step": step,
    **summarise(stacked),
    "steps_per_s": steps_in_line / max(time.perf_counter() - t_line, 1e-9),
  }


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drops the lines of ``path`` (``metrics.jsonl``) past ``last_step``, and a line cut
  short by a killed process (a resumed run writes them again)."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a killed process
      continue
    if rec.get("step", 0) <= last_step:
      keep.append(line)
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(l + "\n" for l in keep))
  os.replace(tmp, path)


class RunLog:
  """Where a training loop reports, from ``t_start`` (``time.perf_counter()``) on, having
  done ``start`` steps: a log line goes to ``out/metrics.jsonl`` (``primary``: the process
  that writes the run's files), to TensorBoard (``cfg.tensorboard``, primary only) and to the
  progress bar (``progress``), which a thread refreshes every second. A context: it opens
  the file and starts the thread, and closes all of them on exit."""

  def __init__(
    self, cfg: Config, out: pathlib.Path, start: int, t_start: float, progress: bool, primary: bool
  ):
    self.budget_s = 60 * cfg.max_minutes
    self.path = out / "metrics.jsonl" if primary else None
    self.bar = _progress_bar(cfg, start) if progress else None
    self.ticker = _Ticker(self.bar, t_start, self.budget_s)
    self.board = _tensorboard(out) if cfg.tensorboard and primary else None
    self.file = None

  def __enter__(self):
    self.ticker.__enter__()
    if self.path is not None:
      self.file = open(self.path, "a")
    return self

  def __exit__(self, *exc):
    try:
      if self.file is not None:
        self.file.close()
      self.ticker.__exit__(*exc)
    finally:
      if self.bar is not None:
        self.bar.close()
      if self.board is not None:
        self.board.close()

  def write(self, rec: dict) -> None:
    """One log line: a line of the file, TensorBoard's scalars, the bar's fields."""
    if self.file is not None:
      self.file.write(json.dumps(rec) + "\n")
      self.file.flush()
    if self.board is not None:
      _write_scalars(self.board, rec)
    if self.bar is not None:
      self.bar.set_postfix(_bar_fields(rec), refresh=False)

  def advance(self, steps: int) -> None:
    """``steps`` more steps taken (the bar counts them; with a time budget it shows the
    seconds elapsed instead)."""
    if self.bar is not None and not self.budget_s:
      self.bar.update(steps)


def _tensorboard(out: pathlib.Path):
  """A TensorBoard writer for ``out/tensorboard`` (tensorboardX: no TensorFlow needed)."""
  from tensorboardX import SummaryWriter

  return SummaryWriter(str(out / "tensorboard"))


def _write_scalars(board, rec: dict) -> None:
  """The numbers of one ``metrics.jsonl`` line, at its step, under the same names."""
  for k, v in rec.items():
    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
      board.add_scalar(k, v, rec["step"])
  board.flush()


class _Ticker:
  """Refreshes a progress bar every second from a thread while training runs; with a time
  budget it also sets the bar to the seconds elapsed."""

  def __init__(self, bar, t_start: float, budget_s: float):
    import threading

    self.bar, self.t_start, self.budget_s = bar, t_start, budget_s
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self.stop.wait(1.0):
      if self.budget_s:
        self.bar.n = min(time.perf_counter() - self.t_start, self.budget_s)
      self.bar.refresh()

  def __enter__(self):
    if self.bar is not None:
      self.thread.start()
    return self

  def __exit__(self, *exc):
    self.stop.set()
    if self.bar is not None:
      self.thread.join()
      if self.budget_s:
        self.bar.n = min(time.perf_counter() - self.t_start, self.budget_s)
        self.bar.refresh()


def _progress_bar(cfg: Config, start: int):
  """Steps against ``iterations``; with ``max_minutes``, seconds against the time budget."""
  from tqdm.auto import tqdm

  desc = f"{cfg.method} {cfg.task}"
  if cfg.max_minutes:
    return tqdm(
      total=round(60 * cfg.max_minutes),
      desc=f"{desc} (time budget)",
      unit="s",
      dynamic_ncols=True,
      bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
    )
  return tqdm(total=cfg.iterations, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def _bar_fields(rec: dict) -> dict:
  """The progress bar's fields of a log line: step, loss, accuracy, rates, speed."""
  post = {"step": rec["step"], "loss": f"{rec['loss']:.3f}"}
  if "accuracy" in rec:
    post["acc"] = f"{rec['accuracy']:.3f}"
  post["alpha"] = f"{rec['alpha']:.3g}"
  for rate in ("beta", "epsilon"):
    if rate in rec:
      post[rate] = f"{rec[rate]:.3g}"
  post["it/s"] = f"{rec['steps_per_s']:.2g}"
  return post
