#!/usr/bin/env bash
# The main job on the embedded default. Until the LaTRO trainer lands (its issue replaces this
# with `latro demo`), the main job is the native ops benchmark: ours against the plain-torch way.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
python benchmarks/bench_ops.py "$@"
