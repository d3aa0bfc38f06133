#!/usr/bin/env bash
# Install R3 with its test dependencies on a CPU machine, then run the whole test suite.
# torch==2.13.0 is pinned so pip takes the CPU build (any other version pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest "$@"
