#!/usr/bin/env bash
# The natural-image suite on one GPU, one process per "dataset:config,config" shard, all at once (the lessons of
# docs/natural_images_notes.md: at 224 px each run is GPU-bound, so shards share the GPU rather than add to it;
# keep to ~11 processes on 80 GB, and give each shard the time its runs need). Results land in one tarball, since
# the device tool returns only a few files.
#   SUITE=.carry/natural.tgz WEIGHTS=.carry/dinov2.fp16.safetensors LIMIT=470 \
#     benchmarks/run_natural_on_device.sh "tuxpaint:head,fork-k2-ft openclipart:adapters-d5" [$OUT/natural.tgz]
set -u
SHARDS=$1
TARBALL=${2:-${OUT:-/tmp}/natural.tgz}
ROOT=${ROOT:-/tmp/natural-data}
OUTD=${OUTD:-/tmp/natural-results}
rm -rf "$OUTD"  # a warm machine keeps /tmp between calls: the tarball must hold this run's results only
mkdir -p "$ROOT" "$OUTD"
[ -n "${SUITE:-}" ] && tar xzf "$SUITE" -C "$ROOT"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
COMMON="--device ${DEVICE:-cuda} --weights ${WEIGHTS:-.carry/dinov2.fp16.safetensors} --img-size ${IMG:-224} \
  --steps ${STEPS:-100} --batch-size ${BATCH:-128} --seeds ${SEEDS:-0,1,2} --sweep-seeds ${SWEEP_SEEDS:-0} \
  --grid ${GRID:-0.01:1:5} --data-root $ROOT --out $OUTD ${EXTRA:-}"
i=0
for spec in $SHARDS; do
  i=$((i + 1))
  timeout "${LIMIT:-470}" python3 benchmarks/accuracy_tables.py $COMMON --datasets "${spec%%:*}" \
    --configs "${spec#*:}" --tag "__n$i" >"$OUTD/${spec%%:*}.n$i.log" 2>&1 &
done
wait
tar czf "$TARBALL" -C "$(dirname "$OUTD")" "$(basename "$OUTD")"
grep -h "seed [0-9]:" "$OUTD"/*.log | sort
grep -l "Traceback" "$OUTD"/*.log || true
