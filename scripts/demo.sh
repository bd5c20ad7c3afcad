#!/usr/bin/env bash
# The main job on the embedded default: set-up, then `latro demo` (base vs SFT vs LaTRO on the
# synthetic task, offline, on the CPU). Arguments go to `latro demo` (default: --out latro_demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
if [ "$#" -eq 0 ]; then set -- --out latro_demo; fi
latro demo "$@"
