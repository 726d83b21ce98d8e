#!/usr/bin/env bash
# Wheels the device tool's GPU machine lacks for sparselab's probes (its python3 3.12 holds torch,
# transformers, peft, accelerate, pyyaml, click and rich, but not pydantic): run here, once per
# machine, before a device call that names `.whl` in its carry (benchmarks/gpu_check.sh installs
# them there). The versions are this environment's.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "pydantic==$(version pydantic)" \
  "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)"
ls .whl
