#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, each part under 10 minutes (32-layer compiles take
# much of it). Each writes JSON and logs under $OUT and prints its tables.
#
#   bash benchmarks/h200_run.sh tests  # every GPU test
#   bash benchmarks/h200_run.sh 1      # compression cost; B1 x {16k, 64k}: rotatek-static, HF static, eager
#   bash benchmarks/h200_run.sh 2      # B1 x 128k and B8 x 32k: eager, rotatek-static
#   bash benchmarks/h200_run.sh peak   # what is alive at the prefill's peak (8 layers, 16k); then
#                                      # B1 x {16k, 64k}: rotatek-static, eager (32 layers)
#   bash benchmarks/h200_run.sh all    # the prefill GPU tests; every point, rotatek-static and eager
#                                      # (one compile; 32 steps)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rotatek_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
part=${1:-1}
started=$SECONDS
left() { echo $(( $1 - (SECONDS - started) )); }  # seconds left of a budget of $1

case "$part" in
  tests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_model.py tests/test_cuda_prefill.py \
      tests/test_cuda_static.py tests/test_triton_decode.py tests/test_compress_layers.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
  1)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_prefill.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
    timeout 60 python3 benchmarks/compress_cost.py --lengths 16384,65536 --reps 5 --out "$OUT" 2>&1 | tee "$OUT/compress_cost.log"
    timeout "$(left 560)" python3 benchmarks/model_decode.py --out "$OUT" --steps 64 \
      --cases 1x16384,1x65536 --backends rotatek-static,static,eager 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -30 ;;
  2)
    timeout "$(left 560)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 \
      --cases 1x131072,8x32768 --backends eager,rotatek-static 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -30 ;;
  peak)
    timeout 200 python3 benchmarks/prefill_profile.py --layers 8 --tokens 16444 --recipes eager,rotatek,rotatek-static \
      --out "$OUT" 2>&1 | grep -v "Warning\|warn\|return forward\|^\s*$" | tee "$OUT/prefill_profile.log" | grep -v " ms .*×" | tail -40
    timeout "$(left 560)" python3 benchmarks/model_decode.py --out "$OUT" --steps 64 \
      --cases 1x16384,1x65536 --backends rotatek-static,eager 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -12 ;;
  all)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_prefill.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 \
      --cases 1x16384,1x65536,1x131072,8x32768 --backends rotatek-static,eager 2>&1 | grep -v "^\s*$" \
      | tee "$OUT/model_decode.log" | tail -12 ;;
esac
echo "part $part done at $((SECONDS - started)) s"
