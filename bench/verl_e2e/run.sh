#!/usr/bin/env bash
# verl's own main_ppo on one GPU, twice: GRPO with SGLang rollout (routed experts captured) and the
# FSDP2 actor colocated, with router_replay.mode=R3 and with replay off (docs/verl.md, "End to end").
#
# Needs: SGLang's wheelhouse unpacked at /tmp/sglang-site and verl's at /tmp/verl-site
# (scripts/verl-on-gpu/README.md gives the device calls). Writes under $OUT:
#   R3/main_ppo.log, R3/metrics.jsonl, off/main_ppo.log, off/metrics.jsonl, summary.json
# and prints a per-step table (k3 KL, replay counters) with the acceptance checks last.
#
# Env: OUT (required), STEPS (default 4), MODES (default "R3 off"), RUN_TIMEOUT seconds per run (default 330),
#      TRAINER=v1|legacy (default v1: verl 0.9.1's default TransferQueue trainer).
# On one H200 (2026-12-01) a run took about 190 s to reach its first step (Ray, TransferQueue, the SGLang
# server, FSDP) and 80 s for the first step, then about 4 s a step: one mode per 10-minute call, e.g.
# MODES=R3 in one call and MODES=off in the next (the model and data are made once per machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the output directory}"
STEPS="${STEPS:-4}"
RUN_TIMEOUT="${RUN_TIMEOUT:-330}"
MODES="${MODES:-R3 off}"
TRAINER="${TRAINER:-v1}"
WORK="${WORK:-/tmp/verl-e2e}"
mkdir -p "$OUT" "$WORK"

# verl and Ray beside SGLang (SGLang's transformers 5.12.1 wins over the image's 5.17), then this repository.
export PYTHONPATH="$PWD:/tmp/verl-site:/tmp/sglang-site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/verl-site/bin:$PATH"
# NVLink multicast stays off (device notes); Ray: no usage stats, no log dedup, no dashboard (launch.py).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

t0=$(date +%s)
python3 -c "import torch, transformers, verl, ray, sglang, tensordict, transfer_queue; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| verl', verl.__version__, '| ray', ray.__version__, '| sglang', sglang.__version__, '| tensordict', tensordict.__version__)" \
  || { echo "imports failed: unpack both wheelhouses first (scripts/verl-on-gpu/README.md)"; exit 2; }
[ -f "$WORK/model/config.json" ] || python3 bench/verl_e2e/model.py --out "$WORK/model" || exit 2
[ -f "$WORK/data/train.parquet" ] || python3 bench/verl_e2e/dataset.py --out "$WORK/data" --train $((8 * STEPS)) --val 8 || exit 2

for mode in $MODES; do
  echo "=== main_ppo, router_replay ${mode} ($(( $(date +%s) - t0 )) s in) ==="
  python3 bench/verl_e2e/launch.py --mode "$mode" --model "$WORK/model" --data "$WORK/data" --out "$OUT/$mode" \
    --trainer "$TRAINER" --timeout "$RUN_TIMEOUT" -- "trainer.total_training_steps=$STEPS"
  echo $? > "$OUT/$mode/returncode"
  echo "rc=$(cat "$OUT/$mode/returncode"); last lines:"; tail -n 15 "$OUT/$mode/main_ppo.log"
  python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true
  nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
done

# Files come back from $OUT only under 16 MB each.
for f in "$OUT"/*/main_ppo.log; do
  [ "$(stat -c %s "$f")" -gt 15000000 ] && xz -T0 -6 "$f"
done
echo "=== done in $(( $(date +%s) - t0 )) s ==="
python3 bench/verl_e2e/report.py "$OUT"
