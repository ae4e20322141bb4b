"""Install size and import time of amaml's virtual environments (BENCHMARKS.md, "Install").

    python3 -m venv /tmp/venv-core && /tmp/venv-core/bin/pip install .
    python3 -m venv /tmp/venv-tfds && /tmp/venv-tfds/bin/pip install ".[tfds]"
    python benchmarks/install_size.py /tmp/venv-core /tmp/venv-tfds

For each environment: its size on disk, the number of installed distributions, and the
median over ``--repeats`` fresh interpreters of the wall time of ``import amaml,
amaml.train, amaml.data`` (what ``amaml train`` imports before it builds anything) and of
``import amaml.data.tfds_omniglot`` where TFDS is installed (the cost of the TFDS path).
Prints one JSON line per environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

IMPORTS = {
  "amaml": "import amaml, amaml.train, amaml.data",
  "tfds path": "import amaml.data.tfds_omniglot",
}


def _size_mb(path: Path) -> float:
  return (
    sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
  )


def _import_s(python: Path, code: str, repeats: int) -> float | None:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
      return None
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("venvs", nargs="+", type=Path)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  for venv in args.venvs:
    python = venv / "bin" / "python"
    dists = subprocess.run(
      [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
    )
    row = {
      "venv": str(venv),
      "size_mb": round(_size_mb(venv), 1),
      "distributions": len(json.loads(dists.stdout)) if dists.returncode == 0 else None,
    }
    for name, code in IMPORTS.items():
      s = _import_s(python, code, args.repeats)
      row[f"import_s {name}"] = None if s is None else round(s, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
