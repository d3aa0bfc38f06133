#!/usr/bin/env bash
# Everything issue 15 measures, in stages, on the GPU machine. Run from the repository root:
#
#   bash bench/gpu_suite.sh                                # call 1: env tests checkpoint roofline kernels profile
#   bash bench/gpu_suite.sh checkpoint throughput          # call 2 (same warm machine): built-in vs SGLang
#   bash bench/gpu_suite.sh env kernels                    # any subset, in the order given
#
# Stages
#   env         nvidia-smi, versions, whether SGLang imports (in a child with its own PYTHONPATH)
#   tests       the gpu-marked engine tests (strict: bit-identical overlap/graphs, sync-free steps, kernels at real shapes)
#   kernel_tests  the kernel unit tests compiled natively (slow: many shapes; not in the default list)
#   checkpoint  bench-qwen3-moe (random bf16, 8.1B) at $MODEL, made on the GPU unless it is there already
#   roofline    copy bandwidth, bf16 matmul rate, bytes per step of each workload
#   kernels     every Triton kernel checked at the model's shapes; fused MoE and decode attention tuned; writes the
#               tuned configs to $STATE/kernels (the engine reads them through R3_KERNEL_CONFIG_DIR) and to $OUT,
#               and the engine options that avoid a failed kernel to $STATE/fallbacks.json
#   layer_kernels  the two short workloads, built-in routes on, with layer_kernels=torch and =triton (fresh engines,
#               the first in their process); the faster goes to $STATE/choices.json, which later stages pass on
#   profile     per-kernel times of one decode step at batch 256 and 512 (torch.profiler), beside the step's floor
#   throughput  the four workloads: built-in engine (routes on/off, overlap on/off) beside SGLang (routes on/off)
#   replay      trainer replay overhead against native routing (bench/replay_overhead.py, issue 11)
#   weights     update_weights against a fresh engine on the same weights, CUDA graphs included (issue 12)
#   colocate    release/resume/update timings on $MODEL (issue 12)
#   train       r3 train recipes/bench-grpo-gpu.yaml on $MODEL, outputs in $OUT/train (issue 12)
#   sglang_weights  the SGLang backend's weight/cache/memory verbs against real SGLang (issue 12; needs SGLang)
#
# Time: the call stops starting stages once SUITE_BUDGET seconds (default 520) have passed, caps each stage by what
# is left, and hands the Python stages their own budget so they stop early and still write their JSON. Each stage's
# JSON is written as soon as it has anything. Output (at most 8 files come back from $OUT): suite.log (everything),
# summary.txt (one line a stage), and the stages' JSON files.
# Environment: OUT (default ./gpu-out), MODEL (default /tmp/bench-qwen3-moe), STATE (default /tmp/r3-state: what a
# later call on the same warm machine reuses), SGLANG_SITE (default: the PYTHONPATH entry that holds sglang, else
# /tmp/sglang-site), SUITE_BUDGET, THROUGHPUT_ARGS, PROFILE_ARGS, KERNELS_ARGS, SGLANG_WEIGHTS_ARGS (extra flags;
# KERNELS_ARGS=--no-tune checks the kernels against the tables committed in rollout/engine/kernels/configs, without
# tuning; SGLANG_WEIGHTS_ARGS=--memory-saver starts SGLang with --enable-memory-saver, so release/resume free memory).
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu-out}"
MODEL="${MODEL:-/tmp/bench-qwen3-moe}"
STATE="${STATE:-/tmp/r3-state}"
SUITE_BUDGET="${SUITE_BUDGET:-520}"
if [ -z "${SGLANG_SITE:-}" ]; then  # SGLang's site-packages (with its own transformers) go to the SGLang child only
  SGLANG_SITE=/tmp/sglang-site
  IFS=: read -ra entries <<<"${PYTHONPATH:-}"
  for entry in "${entries[@]}"; do [ -f "$entry/sglang/__init__.py" ] && SGLANG_SITE="$entry"; done
fi
export PYTHONPATH="$REPO"  # this project's own stages run on the image's packages
mkdir -p "$OUT" "$STATE/kernels"
export R3_KERNEL_CONFIG_DIR="$STATE/kernels"
SUITE_START=$SECONDS
LOG="$OUT/suite.log"

# engine options as --engine-option flags: the layer_kernels stage's choice, then what avoids kernels the kernels stage
# found broken (a fallback wins over a choice)
fallback_flags() {
  python3 - "$STATE/choices.json" "$STATE/fallbacks.json" <<'EOF' | tr '\n' ' '
import json, os, sys
options = {}
for path in sys.argv[1:]:
    if os.path.exists(path):
        options.update(json.load(open(path)))
for key, value in options.items():
    print(f"--engine-option {key}={json.dumps(value)}")
EOF
}
left() { echo $((SUITE_BUDGET - (SECONDS - SUITE_START))); }
# the most a stage may take, so one slow stage leaves time for the next ones (the throughput stage: all that is left)
declare -A STAGE_CAP=([env]=30 [tests]=200 [kernel_tests]=300 [checkpoint]=150 [roofline]=30 [kernels]=180 [profile]=150
  [layer_kernels]=200)

stage_env() {
  nvidia-smi || true
  python3 - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("triton", "transformers", "safetensors", "numpy", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, keep going
        print(name, "unavailable:", exc)
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"device memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
EOF
  PYTHONPATH="$SGLANG_SITE" python3 -c 'import sglang; print("sglang", sglang.__version__, "at", sglang.__file__)' \
    || echo "sglang does not import from $SGLANG_SITE"
  echo "fallbacks from an earlier kernels stage: $(fallback_flags)"
}

stage_tests() { python3 -m pytest -m gpu tests/rollout/engine -q -p no:cacheprovider -rfE --timeout 300; }

stage_kernel_tests() { python3 -m pytest tests/rollout/engine/kernels tests/rollout/engine/test_triton_backend.py -q -p no:cacheprovider -rfE; }

stage_checkpoint() {
  if [ -f "$MODEL/config.json" ]; then echo "reusing $MODEL"; else
    python3 -m recipes.cli init-model --preset bench-qwen3-moe --out "$MODEL" --device cuda
  fi
  du -sh "$MODEL"
  cat "$MODEL"/*.safetensors > /dev/null  # into the page cache, so the first engine load does not pay the disk
}

stage_roofline() { python3 -m bench.roofline --model "$MODEL" --json "$OUT/roofline.json"; }

stage_kernels() {
  python3 -m bench.kernels_microbench --budget-s $(( $(left) - 25 )) --tune-dir "$STATE/kernels" \
    --fallbacks "$STATE/fallbacks.json" --json "$OUT/kernels.json" ${KERNELS_ARGS:-}
  local rc=$?
  cp "$STATE"/kernels/*.json "$OUT"/ 2>/dev/null && ls "$STATE/kernels"
  return $rc
}

stage_layer_kernels() {
  local kernels
  for kernels in torch triton; do
    # shellcheck disable=SC2046
    python3 -m bench.rollout_throughput --model "$MODEL" --workload 64x128+64 256x128+64 --modes on/on \
      $(fallback_flags) --engine-option layer_kernels=$kernels --json "$OUT/layer_kernels_$kernels.json" || return
  done
  python3 - "$OUT" "$STATE/choices.json" <<'EOF'
import json, sys
from rollout.atomic import atomic_write_text
out, choices = sys.argv[1:]
tok_s = {k: [m["tok_s"] for m in json.load(open(f"{out}/layer_kernels_{k}.json"))["measurements"]] for k in ("torch", "triton")}
gain = [b / a for a, b in zip(tok_s["torch"], tok_s["triton"])]
pick = "triton" if len(gain) == 2 and min(gain) > 1.0 else "torch"
print(f"layer_kernels triton / torch per workload: {[round(g, 3) for g in gain]} -> {pick}")
atomic_write_text(choices, json.dumps({"layer_kernels": pick}))
EOF
}

stage_profile() {
  # shellcheck disable=SC2046
  python3 -m bench.decode_profile --model "$MODEL" $(fallback_flags) --json "$OUT/profile.json" ${PROFILE_ARGS:-}
}

stage_throughput() {
  local sglang=""
  if [ -f "$SGLANG_SITE/sglang/__init__.py" ]; then sglang="--sglang --sglang-site $SGLANG_SITE"
  else echo "no SGLang at $SGLANG_SITE: the built-in engine alone"; fi
  # shellcheck disable=SC2046,SC2086
  python3 -m bench.rollout_throughput --model "$MODEL" $sglang --budget-s $(( $(left) - 20 )) $(fallback_flags) \
    --json "$OUT/throughput.json" ${THROUGHPUT_ARGS:-}
}

stage_replay() {
  python3 -m bench.replay_overhead ${REPLAY_ARGS:---device cuda --preset bench-qwen3-moe --batch 4 --seq 2048}
}

stage_weights() { python3 -m bench.weight_update_check --out "$OUT"; }

stage_colocate() { python3 -m bench.colocate --model "$MODEL" --out "$OUT"; }

stage_train() {
  python3 -m recipes.cli train recipes/bench-grpo-gpu.yaml --set model.name="$MODEL" --out "$OUT/train" --no-progress
}

stage_sglang_weights() {
  if [ ! -f "$SGLANG_SITE/sglang/__init__.py" ]; then echo "no SGLang at $SGLANG_SITE: skipped"; return 1; fi
  # this process imports rollout.sglang, whose reply models need pydantic: the image lacks it, SGLang's site has it
  # shellcheck disable=SC2086
  PYTHONPATH="$REPO:$SGLANG_SITE" python3 -m bench.sglang_weights_check --sglang-site "$SGLANG_SITE" --out "$OUT" \
    ${SGLANG_WEIGHTS_ARGS:-}
}

run_stage() {
  local name="$1" start=$SECONDS rc
  if ! declare -F "stage_$name" >/dev/null; then echo "unknown stage $name" | tee -a "$OUT/summary.txt"; return; fi
  local limit; limit=$(left)
  if [ "$limit" -lt 30 ]; then echo "$name skipped: suite budget spent" | tee -a "$OUT/summary.txt"; return; fi
  local cap="${STAGE_CAP[$name]:-$limit}"
  [ "$cap" -lt "$limit" ] && limit=$cap
  echo "=== $name (suite at $((SECONDS - SUITE_START))s, ${limit}s left)" | tee -a "$LOG"
  # a child bash under timeout, so one hung stage cannot eat the whole call
  export -f "stage_$name" fallback_flags left; export REPO OUT MODEL STATE SGLANG_SITE SUITE_BUDGET SUITE_START
  # inside the stage, left() counts down from this stage's own limit
  timeout --kill-after=10 "$((limit - 5))" bash -c "SUITE_BUDGET=$limit; SUITE_START=0; SECONDS=0; stage_$name" 2>&1 \
    | tee -a "$LOG" | tail -n 40
  rc=${PIPESTATUS[0]}
  printf '%-12s rc=%-4s %5ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests checkpoint roofline kernels profile)
date -u +"suite start %Y-%m-%dT%H:%M:%SZ stages: ${stages[*]}; budget ${SUITE_BUDGET}s" | tee -a "$OUT/summary.txt"
for s in "${stages[@]}"; do run_stage "$s"; done
echo "total $((SECONDS - SUITE_START))s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
