#!/usr/bin/env bash
# Serving load tests on a GPU host, side by side in one call: each "INTERVAL:WORKERS[:JPEG[:MODEL[:OVERLAP]]]" setting
# (the server's --switch-interval-ms, --workers, --jpeg-decode (default auto), MODEL shared (default) or per-worker,
# and --overlap-passes (default auto)),
# at K = 1 and 10, REQ requests (default 8000) of IPR images (default "1 8"), EXTRA arguments for serve_load (e.g.
# --no-live-add); the serve extra (uvloop, httptools, aiohttp included) travels as wheels in .whl (the device README).
#   [IPR="1 8"] [REQ=8000] [EXTRA=...] benchmarks/run_serving_on_device.sh ["0.2:4 0.2:4:auto:shared:off"] [OUTDIR]
set -u
SETTINGS=${1:-0.2:1 0.2:4 0.2:4:auto:per-worker}
OUTDIR=${2:-${OUT:-/tmp}}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
for setting in $SETTINGS; do
  IFS=: read -r ms workers jpeg model overlap <<< "$setting"
  jpeg=${jpeg:-auto} model=${model:-shared} overlap=${overlap:-auto}
  flag=; [ "$model" = per-worker ] && flag=--no-shared-model
  for ipr in ${IPR:-1 8}; do
    python3 benchmarks/serve_load.py --device cuda --tasks 1,10 --requests $((${REQ:-8000} / ipr)) --clients 64 \
      --client-procs 4 --images-per-request $ipr --switch-interval-ms "$ms" --workers "$workers" \
      --jpeg-decode "$jpeg" $flag --overlap-passes "$overlap" --registry-cache /tmp/serve-registries ${EXTRA:-} \
      --json-out "$OUTDIR/serve_sw${ms}_w${workers}_${jpeg}_${model}_overlap-${overlap}_ipr${ipr}.json" \
      2>&1 | tail -4
  done
done
