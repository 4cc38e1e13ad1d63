#!/usr/bin/env bash
# Device check (issue 21, item 4): caching, SAE training and evaluation throughput on one GPU, in under
# 8 minutes of device time with the defaults. Run from anywhere on a machine with torch, open_clip,
# transformer_lens and sae_lens installed (nothing is downloaded: random weights, synthetic images):
#
#   bash benchmarks/device_check.sh                       # GPU: ViT-B/32, B/16, L/14; JSON to device_check.json
#   bash benchmarks/device_check.sh --tiny --device cpu   # every step at toy sizes (the test suite runs this)
#
# Extra arguments go to benchmarks/device_check.py (--help lists them). One line per figure; all figures
# also in --json-out (default: device_check.json in the current folder).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
json="device_check.json"
for a in "$@"; do [[ "$a" == --json-out* ]] && json=""; done
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${DEVICE_CHECK_TIMEOUT:-480}" "${PYTHON:-python}" "$here/device_check.py" \
    ${json:+--json-out "$json"} "$@"
