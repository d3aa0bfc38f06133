#!/usr/bin/env bash
# Install R3 with its test dependencies on a CPU machine, then run the whole test suite.
# torch==2.13.0 is pinned so pip takes the CPU build (any other version pulls a multi-GB CUDA build).
# verl is installed without its dependencies (they would pull vLLM/SGLang and a CUDA torch); the
# requirements file pins only what verl's FSDP engine path imports.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps "verl==0.9.1"
python3 -m pip install -q -r trainer_bridge/verl/requirements-ci.txt torch==2.13.0 "transformers>=5.5.3,<5.11"
python3 -m pytest "$@"
