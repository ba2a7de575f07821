#!/usr/bin/env bash
# Accuracy tables on one GPU in parallel shards (the per-task training path is host-bound at 112 px, so several
# processes share the GPU well). Timing runs first, alone, so its numbers are not disturbed by the shards.
#   OUTD=/tmp/tables LIMIT=480 benchmarks/run_tables_on_device.sh packed:.device/fashion-mnist.npz [--timing]
#   IMG=224 EXTRA="--data-root .carry/natural" benchmarks/run_tables_on_device.sh tuxpaint,emoji-apple
# BY_RATE=1: one process per (config, rate) of GRID (every seed at that rate), merged afterwards into $OUTD/merged by
# benchmarks/merge_tables.py with the same rate choice; one config's sweep then takes one run's time, not eleven.
set -u
DATASETS=$1
OUTD=${OUTD:-/tmp/tables}
LIMIT=${LIMIT:-480}
COMMON="--device ${DEVICE:-cuda} --weights ${WEIGHTS:-.device/dinov2.fp16.safetensors} --img-size ${IMG:-224} --steps ${STEPS:-2000} \
  --batch-size ${BATCH:-256} --seeds ${SEEDS:-0,1,2} --out $OUTD ${EXTRA:-}"
mkdir -p "$OUTD"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
if [ "${2:-}" = "--timing" ]; then
  python3 benchmarks/accuracy_tables.py $COMMON --timing ${TIMING_CONFIGS:+--configs $TIMING_CONFIGS} \
    --tag "${TAG:-}" >"$OUTD/timing${TAG:-}.log" 2>&1
fi
SHARDS=(${SHARDS:-full,head memory-m20,head+cls memory-m10,masked-m5 memory-m5,masked-m10 memory-m1,fork-k1
        head+cls-unmasked,fork-k2 masked-m5-tokens4,fork-k4 fork-k4-m1,fork-k6})
GRID=${GRID:-0.01:1:5}
if [ -n "${BY_RATE:-}" ]; then
  RATES=$(python3 -c "import sys; sys.path.insert(0, '.'); from scenarios.protocol import parse_grid; \
print(' '.join(map(str, parse_grid('$GRID'))))")
  for ds in ${DATASETS//,/ }; do
    name=$(basename "${ds#packed:}" .npz)
    for config in ${SHARDS[@]//,/ }; do
      for lr in $RATES; do
        timeout "$LIMIT" python3 benchmarks/accuracy_tables.py $COMMON --datasets "$ds" --configs "$config" \
          --grid "$lr" --full-grid "$lr" --tag "${TAG:-}__${config}__lr$lr" >"$OUTD/$name${TAG:-}.$config.lr$lr.log" 2>&1 &
      done
    done
  done
  wait
  python3 benchmarks/merge_tables.py "$OUTD" --out "$OUTD/merged"
  exit
fi
for ds in ${DATASETS//,/ }; do
  for i in "${!SHARDS[@]}"; do
    name=$(basename "${ds#packed:}" .npz)
    timeout "$LIMIT" python3 benchmarks/accuracy_tables.py $COMMON --datasets "$ds" --configs "${SHARDS[$i]}" \
      --tag "${TAG:-}__s$i" >"$OUTD/$name${TAG:-}.s$i.log" 2>&1 &
  done
done
wait
grep -h "seed" "$OUTD"/*.log | grep -v Warn | sort | tail -n 200
