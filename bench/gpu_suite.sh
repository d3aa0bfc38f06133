#!/usr/bin/env bash
# Everything issue 8 measures, in one call on the GPU machine. Run from the repository root:
#
#   bash bench/gpu_suite.sh                      # default stages: deps env checkpoint roofline kernels throughput
#   bash bench/gpu_suite.sh sglang               # real SGLang vs the built-in engine (needs /tmp/sglang-site unpacked;
#                                                # do not export PYTHONPATH=/tmp/sglang-site: only the SGLang child gets it)
#   bash bench/gpu_suite.sh env kernels          # any subset, in the order given (a stage may repeat)
#
# Stages: deps env checkpoint roofline kernels throughput (default), gpu_tests, replay, sglang, suite (the whole pytest
# suite), eager (built-in engine, routes on/overlap on, torch attention, no CUDA graphs), graphs_off (the same with paged
# Triton attention). throughput runs the built-in engine with attention_backend=triton and cuda_graph=true.
# Issue 12 (RL): weights (update_weights vs a fresh engine, CUDA graphs included), colocate (release/resume/update
# timings on $MODEL), train (r3 train recipes/bench-grpo-gpu.yaml on $MODEL, outputs in $OUT/train), sglang_weights
# (the SGLang backend's weight/cache/memory verbs against real SGLang; needs /tmp/sglang-site unpacked):
#   bash bench/gpu_suite.sh deps checkpoint weights colocate train
# Stage i logs to $OUT/<i>-<stage>.log (JSON results alike) and its wall time to $OUT/summary.txt; a failed stage
# never stops the next.
# The whole call stops starting stages once SUITE_BUDGET seconds (default 540) have passed, and caps each stage's
# timeout by what is left, so the summary and logs come back inside a 10-minute call.
# Environment: OUT (default ./gpu-out), MODEL (default /tmp/bench-qwen3-moe), STAGE_TIMEOUT seconds (default 420),
# SGLANG_SITE (default /tmp/sglang-site), WHEELS (folder of pytest wheels, default ./.gpu-wheels), THROUGHPUT_ARGS (extra bench.rollout_throughput flags), REPLAY_ARGS.
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install below cannot run
OUT="${OUT:-$REPO/gpu-out}"
MODEL="${MODEL:-/tmp/bench-qwen3-moe}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-420}"
SUITE_BUDGET="${SUITE_BUDGET:-540}"
SGLANG_SITE="${SGLANG_SITE:-/tmp/sglang-site}"
WHEELS="${WHEELS:-$REPO/.gpu-wheels}"
mkdir -p "$OUT"
SUITE_START=$SECONDS
STAGE_COUNT=0

stage_env() {
  nvidia-smi || true
  python - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("triton", "transformers", "safetensors", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, keep going
        print(name, "unavailable:", exc)
# torch._grouped_mm self-check: does it exist, and is the calling convention what the engine (models/layers.experts_forward) assumes?
# Convention assumed: A [M, K] rows sorted by group, B [G, K, N], offs int32 [G] = cumulative END row of each group.
print("torch._grouped_mm:", hasattr(torch, "_grouped_mm"), "| F.grouped_mm:", hasattr(torch.nn.functional, "grouped_mm"))
if hasattr(torch, "_grouped_mm") and torch.cuda.is_available():
    a = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    ends = [5, 5, 23, 40]  # group 1 is empty on purpose
    out = torch._grouped_mm(a, b, offs=torch.tensor(ends, device="cuda", dtype=torch.int32))
    starts = [0] + ends[:-1]
    ref = torch.cat([a[s:e].float() @ b[g].float() for g, (s, e) in enumerate(zip(starts, ends))])
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"torch._grouped_mm(A[M,K], B[G,K,N], offs=cumulative ends int32): rel err {rel:.2e}",
          "OK" if rel < 1e-2 else "MISMATCH")
    try:
        torch._grouped_mm(a.float(), b.float(), offs=torch.tensor(ends, device="cuda", dtype=torch.int32))
        print("torch._grouped_mm fp32 on CUDA: accepted")
    except Exception as exc:
        print("torch._grouped_mm fp32 on CUDA: refused:", str(exc).splitlines()[0])
EOF
}

# The image may lack pytest: install it from carried wheels (pip download pytest pytest-timeout hypothesis, cp312).
stage_deps() {
  python -m pip install -e . --no-deps --no-build-isolation -q || echo "editable install failed; using PYTHONPATH"
  if python -c "import pytest, pytest_timeout, hypothesis" 2>/dev/null; then echo "pytest, pytest-timeout, hypothesis present"
  elif [ -d "$WHEELS" ]; then python -m pip install -q --no-index --find-links "$WHEELS" pytest pytest-timeout hypothesis
  else echo "pytest/pytest-timeout/hypothesis missing and no wheel folder at $WHEELS"; return 1; fi
}

stage_checkpoint() {
  if [ -f "$MODEL/config.json" ]; then echo "reusing $MODEL"; else
    python -m recipes.cli init-model --preset bench-qwen3-moe --out "$MODEL" --device cuda
  fi
  du -sh "$MODEL"
}

stage_roofline() { python -m bench.roofline --model "$MODEL" --json "$OUT/$STAGE_ID-roofline.json"; }

stage_kernels() {
  python -m pytest tests/rollout/engine/kernels -q -p no:cacheprovider
  python -m bench.kernels_microbench --json "$OUT/$STAGE_ID-microbench.json"
}

stage_gpu_tests() { python -m pytest tests -m gpu -q -p no:cacheprovider; }

stage_suite() { python -m pytest tests -q -p no:cacheprovider -x --timeout 300; }

# The engine's CUDA options as of 2026-11-27 21:00 UTC: attention_backend (torch|triton), cuda_graph (bool).
FAST_OPTIONS="--engine-option attention_backend=triton --engine-option cuda_graph=true"

# The headline table: built-in engine (paged Triton attention + CUDA graphs) in all four modes, and transformers.
stage_throughput() {
  python -m bench.rollout_throughput --model "$MODEL" $FAST_OPTIONS --json "$OUT/$STAGE_ID-throughput.json" ${THROUGHPUT_ARGS:-}
}

# What the CUDA path bought: routes on / overlap on with the torch attention path and no graphs.
stage_eager() {
  python -m bench.rollout_throughput --model "$MODEL" --engines builtin --modes on/on \
    --json "$OUT/$STAGE_ID-eager.json" ${THROUGHPUT_ARGS:-}
}

# What the graphs alone bought: paged Triton attention, no graphs.
stage_graphs_off() {
  python -m bench.rollout_throughput --model "$MODEL" --engines builtin --modes on/on \
    --engine-option attention_backend=triton --json "$OUT/$STAGE_ID-graphs_off.json" ${THROUGHPUT_ARGS:-}
}

stage_replay() {
  # its last log line is the JSON result
  if [ -f bench/replay_overhead.py ]; then
    python -m bench.replay_overhead ${REPLAY_ARGS:---device cuda --preset bench-qwen3-moe --batch 4 --seq 2048}
  else echo "bench/replay_overhead.py not present: skipped"; fi
}

stage_sglang() {
  if [ ! -d "$SGLANG_SITE/sglang" ]; then echo "no SGLang at $SGLANG_SITE (see ../shared/tools/sglang-on-gpu): skipped"; return 1; fi
  # Same run, same card: the built-in engine with overlap on beside SGLang's three modes.
  python -m bench.rollout_throughput --model "$MODEL" --engines builtin --modes on/on,off/on --sglang \
    $FAST_OPTIONS \
    --sglang-site "$SGLANG_SITE" --json "$OUT/$STAGE_ID-throughput_sglang.json" ${THROUGHPUT_ARGS:-}
}

stage_weights() { python -m bench.weight_update_check --out "$OUT"; }

stage_colocate() { python -m bench.colocate --model "$MODEL" --out "$OUT"; }

stage_train() {
  python -m recipes.cli train recipes/bench-grpo-gpu.yaml --set model.name="$MODEL" --out "$OUT/train" --no-progress
}

stage_sglang_weights() {
  if [ ! -d "$SGLANG_SITE/sglang" ]; then echo "no SGLang at $SGLANG_SITE (see ../shared/tools/sglang-on-gpu): skipped"; return 1; fi
  python -m bench.sglang_weights_check --sglang-site "$SGLANG_SITE" --out "$OUT"
}

run_stage() {
  local name="$1" start=$SECONDS rc
  if ! declare -F "stage_$name" >/dev/null; then echo "unknown stage $name" | tee -a "$OUT/summary.txt"; return; fi
  STAGE_ID="$((++STAGE_COUNT))"
  local left=$((SUITE_BUDGET - (SECONDS - SUITE_START)))
  if [ "$left" -lt 30 ]; then echo "$STAGE_ID $name skipped: suite budget spent" | tee -a "$OUT/summary.txt"; return; fi
  local limit=$((left < STAGE_TIMEOUT ? left : STAGE_TIMEOUT))
  echo "=== $STAGE_ID $name (suite at $((SECONDS - SUITE_START))s)"
  # timeout runs the stage in a child bash so one hung stage cannot eat the whole call
  export -f "stage_$name"; export OUT MODEL SGLANG_SITE STAGE_ID FAST_OPTIONS WHEELS
  timeout --kill-after=10 "$limit" bash -c "stage_$name" >"$OUT/$STAGE_ID-$name.log" 2>&1
  rc=$?
  printf '%-3s %-12s rc=%-4s %5ss\n' "$STAGE_ID" "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$STAGE_ID-$name.log"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(deps env checkpoint roofline kernels throughput)
date -u +"suite start %Y-%m-%dT%H:%M:%SZ stages: ${stages[*]}" | tee -a "$OUT/summary.txt"
for s in "${stages[@]}"; do run_stage "$s"; done
echo "total $((SECONDS - SUITE_START))s" | tee -a "$OUT/summary.txt"
