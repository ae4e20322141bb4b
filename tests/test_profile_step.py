"""benchmarks/profile_step.py: the op categories, self times on hand-written nested events,
and the XLA trace reader on a real profile of a small jitted function (the benchmark itself
needs the peers and minutes per implementation)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step as ps  # noqa: E402


@pytest.mark.parametrize(
  "name,side,expected",
  [
    ("convolution.12", "xla", "convolutions"),
    ("conv_general_dilated.86", "xla", "convolutions"),
    ("broadcast_subtract_fusion.11", "xla", "element-wise"),
    ("wrapped_broadcast.12", "xla", "fills"),
    ("ynn_fusion.3", "xla", "products"),
    ("transpose_copy_fusion", "xla", "copies and transposes"),
    ("concatenate.7", "xla", "pads, slices, concatenations"),
    ("loop_broadcast_fusion.2", "xla", "fills"),
    ("input_reduce_fusion", "xla", "reductions"),
    ("while.1", "xla", "control"),
    ("loop_multiply_fusion.9", "xla", "element-wise"),
    ("aten::mkldnn_convolution", "torch", "convolutions"),
    ("aten::convolution_backward", "torch", "convolutions"),
    ("aten::addmm", "torch", "products"),
    ("aten::max_pool2d_with_indices_backward", "torch", "pooling"),
    ("aten::native_batch_norm_backward", "torch", "batch norm"),
    ("aten::threshold_backward", "torch", "element-wise"),
    ("aten::result_type", "torch", "other"),
    ("aten::copy_", "torch", "copies and transposes"),
    ("aten::fill_", "torch", "fills"),
    ("aten::sum", "torch", "reductions"),
    ("aten::clamp_min", "torch", "element-wise"),
  ],
)
def test_category(name, side, expected):
  assert ps.category(name, side) == expected


def test_self_times_subtract_nested_events_per_thread():
  ev = [
    {"name": "while", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
    {"name": "conv", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
    {"name": "fusion", "ts": 50, "dur": 20, "pid": 1, "tid": 1},
    {"name": "inner", "ts": 55, "dur": 5, "pid": 1, "tid": 1},  # nested two deep
    {"name": "conv", "ts": 120, "dur": 7, "pid": 1, "tid": 1},  # after the loop
    {"name": "conv", "ts": 20, "dur": 40, "pid": 1, "tid": 2},  # another thread, overlapping
  ]
  assert ps.self_times(ev) == {"while": 50, "conv": 77, "fusion": 15, "inner": 5}


def test_summarize_sums_categories_per_step():
  out = ps.summarize({"convolution.1": 3.0, "convolution.2": 1.0, "copy.4": 2.0}, "xla", 2)
  assert out["categories"]["convolutions"] == 2.0
  assert out["categories"]["copies and transposes"] == 1.0
  assert out["op_s_per_step"] == 3.0
  assert out["top_ops"][0] == ("convolution.1", 1.5, "convolutions")


def test_xla_op_seconds_reads_a_real_profile(tmp_path):
  f = jax.jit(lambda x, k: jnp.sum(jax.lax.conv(x, k, (1, 1), "SAME") ** 2))
  x, k = jnp.ones((16, 1, 28, 28)), jnp.ones((8, 1, 3, 3))
  f(x, k).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(x, k).block_until_ready()
  ops = ps.xla_op_seconds(str(tmp_path))
  cats = ps.summarize(ops, "xla", 3)["categories"]
  assert cats["convolutions"] > 0
  assert all(0 <= s < 10 for s in ops.values())


def test_table_lists_each_implementation():
  row = lambda impl, conv: {
    "impl": impl,
    "categories": {"convolutions": conv, "fills": 0.001},
    "op_s_per_step": conv,
    "wall_s_per_step": conv + 0.1,
    "step_s": conv + 0.2,
  }
  text = ps.table([row("amaml-maml", 1.0), row("torchfunc-loop", 0.5)])
  assert "| category | amaml-maml | torchfunc-loop |" in text
  assert "| convolutions | 1.00 | 0.50 |" in text
  assert "fills" not in text  # under 5 ms in every column
  assert "| **wall time, profiled** | 1.10 | 0.60 |" in text
  assert "| **step, not profiled** | 1.20 | 0.70 |" in text
