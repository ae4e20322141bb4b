"""benchmarks/ab_layers.py: its ``--set`` parsing, that a setting holds only while the step
is built, and ``--impl-b`` (the timing itself needs the peers and minutes per config)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_layers  # noqa: E402

from amaml.models import layers


def test_settings_take_the_type_of_the_current_value():
  got = ab_layers.parse_settings(["TAPS_CHANNELS=0", "KERNEL_GRAD_MATMUL_PIXELS=64"], layers)
  assert got == {"TAPS_CHANNELS": 0, "KERNEL_GRAD_MATMUL_PIXELS": 64}
  assert all(type(v) is int for v in got.values())


@pytest.mark.parametrize(
  "pair, message",
  [
    ("NO_SUCH=1", "NAME one of"),
    ("TAPS_CHANNELS", "NAME one of"),
    ("TAPS_CHANNELS=x", "is not a int"),
  ],
)
def test_a_bad_setting_is_a_one_line_error(pair, message):
  with pytest.raises(SystemExit) as e:
    ab_layers.parse_settings([pair], layers)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_flag_takes_true_or_false():
  assert ab_layers.parse_settings(["POOL_OWN_VJP=False"], layers) == {"POOL_OWN_VJP": False}
  assert ab_layers.parse_settings(["POOL_OWN_VJP=true"], layers) == {"POOL_OWN_VJP": True}
  with pytest.raises(SystemExit, match="is not a bool"):
    ab_layers.parse_settings(["POOL_OWN_VJP=0"], layers)


def test_a_setting_holds_while_the_step_builds_and_is_restored(monkeypatch):
  seen = []
  monkeypatch.setattr(ab_layers.throughput, "build", lambda args: seen.append(layers.TAPS_CHANNELS))
  before = layers.TAPS_CHANNELS
  ab_layers.build(None, {"TAPS_CHANNELS": before + 5})
  assert seen == [before + 5] and layers.TAPS_CHANNELS == before


def test_an_inner_loop_setting_is_found_and_restored(monkeypatch):
  """``--set`` also reaches ``amaml.inner_loop`` (``ONE_AT_A_TIME_ELEMENTS``)."""
  from amaml import inner_loop

  got = ab_layers.parse_settings(["ONE_AT_A_TIME_ELEMENTS=7"], *ab_layers._modules())
  assert got == {"ONE_AT_A_TIME_ELEMENTS": 7}
  seen = []
  monkeypatch.setattr(
    ab_layers.throughput, "build", lambda args: seen.append(inner_loop.ONE_AT_A_TIME_ELEMENTS)
  )
  before = inner_loop.ONE_AT_A_TIME_ELEMENTS
  ab_layers.build(None, got)
  assert seen == [7] and inner_loop.ONE_AT_A_TIME_ELEMENTS == before


def test_the_same_step_twice_is_a_one_line_error():
  with pytest.raises(SystemExit) as e:
    ab_layers.main(["--impl", "alpha", "--impl-b", "alpha"])
  assert "nothing to compare" in str(e.value) and "\n" not in str(e.value)


def test_impl_b_builds_the_set_side_as_another_method(monkeypatch, capsys):
  built = []

  def fake_build(args):
    built.append(args.impl)
    step = lambda state, batch: state + 1.0
    return SimpleNamespace(
      compiled=step, carry=lambda out: out, state=jnp.zeros(()), pool=[0], compile_s=0.0
    )

  monkeypatch.setattr(ab_layers.throughput, "build", fake_build)
  ab_layers.main(["--impl", "alpha", "--impl-b", "alpha-no-backtrack", "--rounds", "2"])
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert built == ["amaml-alpha", "amaml-alpha-no-backtrack"]
  assert (row["impl"], row["impl_b"], row["settings"]) == (
    "amaml-alpha",
    "amaml-alpha-no-backtrack",
    {},
  )
  assert len(row["pair_ratios"]) == 2
