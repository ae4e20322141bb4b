"""Keyword arguments with a new name: the old name raises a one-line ``TypeError`` that
gives the new one, instead of Python's bare "unexpected keyword argument"."""

from __future__ import annotations

import functools


def renamed_keywords(**renames: str):
  """Decorator: a call that passes ``old=`` of ``renames`` (``old="new"``) raises
  ``TypeError`` naming ``new=``.

  >>> @renamed_keywords(max_steps="eval_inner_steps")
  ... def f(eval_inner_steps=None):
  ...   return eval_inner_steps
  >>> f(max_steps=3)
  Traceback (most recent call last):
  TypeError: f(): max_steps= was renamed eval_inner_steps=: pass eval_inner_steps=3
  """

  def wrap(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
      for old, new in renames.items():
        if old in kwargs:
          raise TypeError(f"{fn.__name__}(): {old}= was renamed {new}=: pass {new}={kwargs[old]!r}")
      return fn(*args, **kwargs)

    return call

  return wrap
