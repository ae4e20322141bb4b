"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

While :func:`amaml.train.train` runs its loop, the first of these signals asks it to stop
after the current call of the jitted loop, write a checkpoint and raise
:class:`Interrupted`; ``amaml train`` then prints one line (the step, the checkpoint, the
command that resumes) and exits with 128 + the signal's number (130, 143). A second signal
exits at once (the checkpoints, written atomically, stay intact).
"""

from __future__ import annotations

import os
import signal
import threading
import time

#: The signals :class:`StopRequest` catches: Ctrl-C and a scheduler's polite stop.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """Training stopped by a signal after writing the checkpoint of ``step`` in ``directory``."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(
      f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint in {directory}"
    )

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """A context that catches :data:`SIGNALS` (in the main thread only; elsewhere it does
  nothing): ``signum`` is the first one received, or None; a second one ends the process
  at once with exit code 128 + its number. The previous handlers come back on exit."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      os.write(2, f"\namaml: second {signal.Signals(signum).name}: exiting now\n".encode())
      os._exit(128 + signum)
    self.signum = signum


def wait_ready(x, poll_s: float = 0.005) -> None:
  """Waits for the array ``x`` in short sleeps, so that a signal handler runs while a
  jitted call computes (a blocking read would delay it to the end of the call)."""
  while not x.is_ready():
    time.sleep(poll_s)
