#!/usr/bin/env bash
# Serving load tests on a GPU host, side by side in one call: each "INTERVAL:WORKERS" setting (the server's
# --switch-interval-ms and --workers) at K = 1 and 10, one and eight images per request; the serve extra (uvloop,
# httptools, aiohttp included) travels as wheels in .whl (the device README).
#   benchmarks/run_serving_on_device.sh ["5:1 0.2:1 0.2:4"] [OUTDIR=$OUT]
set -u
SETTINGS=${1:-5:1 0.2:1 0.2:4}
OUTDIR=${2:-${OUT:-/tmp}}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
for setting in $SETTINGS; do
  ms=${setting%%:*} workers=${setting#*:}
  for ipr in 1 8; do
    python3 benchmarks/serve_load.py --device cuda --tasks 1,10 --requests $((4000 / ipr)) --clients 64 \
      --client-procs 4 --images-per-request $ipr --iters 10 --switch-interval-ms "$ms" --workers "$workers" \
      --json-out "$OUTDIR/serve_sw${ms}_w${workers}_ipr${ipr}.json" 2>&1 | tail -4
  done
done
