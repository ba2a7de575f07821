#!/usr/bin/env bash
# A screen on one GPU: one process per (config, rate), all at once, one seed, results in one tarball (the device
# tool returns a few files). What docs/domain_shift.md's screens ran, e.g.
#   WEIGHTS=.carry/d26/dinov2.fp16.safetensors LIMIT=470 \
#     benchmarks/run_screen_on_device.sh packed:.carry/d26/glyphs.npz "head=0.3 head=1.0 memory-m10=0.03 fork-k3-ft=0.05"
set -u
DATASET=$1
SPECS=$2
OUTD=${OUTD:-/tmp/screen}
rm -rf "$OUTD"; mkdir -p "$OUTD"  # a warm machine keeps /tmp between calls: the tarball holds this run only
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=1
C="--device ${DEVICE:-cuda} --weights ${WEIGHTS:-.carry/dinov2.fp16.safetensors} --img-size ${IMG:-224} \
  --steps ${STEPS:-2000} --batch-size ${BATCH:-128} --seeds ${SEEDS:-0} --sweep-seeds ${SWEEP_SEEDS:-0} --out $OUTD"
name=$(basename "${DATASET#packed:}" .npz)
for spec in $SPECS; do
  cfg=${spec%%=*}; lr=${spec#*=}
  timeout "${LIMIT:-470}" python3 benchmarks/accuracy_tables.py $C --datasets "$DATASET" --configs "$cfg" \
    --grid "$lr" --full-grid "$lr" --tag "__${cfg}__lr$lr" >"$OUTD/$name.$cfg.$lr.log" 2>&1 &
done
wait
grep -h "seed [0-9]:" "$OUTD"/*.log | sort
grep -l "Traceback" "$OUTD"/*.log || true
tar czf "${OUT:-/tmp}/screen.tgz" -C "$(dirname "$OUTD")" "$(basename "$OUTD")"
