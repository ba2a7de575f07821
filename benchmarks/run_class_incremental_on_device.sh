#!/usr/bin/env bash
# The class-incremental table on one GPU: one process per shard, all at once (each is far from GPU-bound: Avalanche
# preprocesses per sample on the host), results in one tarball (the device tool returns only a few files).
# A shard is "DATASET [options of python -m scenarios.class_incremental]"; shards are separated by ';'.
# The device image lacks Avalanche: its wheels travel in $CARRY/whl; wandb, which Avalanche 0.6 imports at module level
# for a metric we never use, is a stand-in module in $CARRY/stub (the real wheel does not fit the carry limit).
#   CARRY=.carry/ci benchmarks/run_class_incremental_on_device.sh \
#     "mnist-5k --learners ours,prototype; mnist-5k --learners naive,lwf,ewc,replay --recipe paper" [$OUT/ci.tgz]
set -u
SHARDS=$1
TARBALL=${2:-${OUT:-/tmp}/class_incremental.tgz}
CARRY=${CARRY:-.carry/ci}
OUTD=${OUTD:-/tmp/class-incremental}
rm -rf "$OUTD" && mkdir -p "$OUTD"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/avsite "$CARRY"/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/avsite:$CARRY/stub:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2}
i=0
IFS=';' read -ra LIST <<<"$SHARDS"
for shard in "${LIST[@]}"; do
  read -ra ARGS <<<"$shard"
  i=$((i + 1))
  name=${ARGS[0]}
  timeout "${LIMIT:-540}" python3 -m scenarios.class_incremental --dataset "packed:$CARRY/$name.npz" \
    --seeds "${SEEDS:-0,1,2}" --budget gpu --device cuda --weights "$CARRY/dinov2.fp16.safetensors" \
    --out "$OUTD/$name.s$i" "${ARGS[@]:1}" >"$OUTD/$name.s$i.log" 2>&1 &
done
wait
tar czf "$TARBALL" -C "$(dirname "$OUTD")" "$(basename "$OUTD")"
grep -h "seed [0-9]:" "$OUTD"/*.log | sort | uniq -c | tail -3
grep -l "Traceback" "$OUTD"/*.log && grep -h -A3 "Error" "$OUTD"/*.log | tail -20 || true
