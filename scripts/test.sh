#!/usr/bin/env bash
# Install R3 with its test dependencies on a CPU machine, then run the whole test suite.
# torch==2.13.0 is pinned so pip takes the CPU build (any other version pulls a multi-GB CUDA build).
# verl is installed without its dependencies (they would pull vLLM/SGLang and a CUDA torch); the
# requirements file pins only what verl's FSDP engine path imports.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip's output is kept out of the way: shown in full when an install fails, otherwise reduced
# to one line about the only expected complaint (verl's undeclared dependencies, see below).
install() {
    local log
    log=$(mktemp)
    if ! python3 -m pip install -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "scripts/test.sh: pip install $* failed (output above)" >&2
        return 1
    fi
    if grep -q "dependency conflicts" "$log"; then
        # `--no-deps verl` leaves verl's declared runtime packages (wandb, tensorboard, torchdata, ...)
        # uninstalled on purpose: the FSDP engine path the tests drive imports none of them.
        echo "scripts/test.sh: note: pip reports verl's uninstalled optional runtime packages" \
             "($(grep -o 'requires [A-Za-z0-9_.-]*' "$log" | cut -d' ' -f2 | sort -u | paste -sd, -));" \
             "expected, the tests need none of them" >&2
    fi
    rm -f "$log"
}

echo "scripts/test.sh: installing R3 and its test dependencies (a few minutes on a fresh venv)" >&2
install torch==2.13.0
install -e ".[test]"
install --no-deps "verl==0.9.1"
install -r trainer_bridge/verl/requirements-ci.txt torch==2.13.0 "transformers>=5.5.3,<5.11"
python3 -m pytest "$@"
