#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in two parts of under 10 minutes each (the 32-layer
# compiles take most of it). Each writes JSON and logs under $OUT and prints its tables.
#
#   bash benchmarks/h200_run.sh 1   # GPU tests, compression cost, B1 x {16k, 64k}: rotatek-static vs eager
#   bash benchmarks/h200_run.sh 2   # B1 x 128k and B8 x 32k, HF's static recipe too, max batch at 64k
#
# Part 1 also packs Inductor's compile cache into $OUT/inductor_cache.tgz; unpacked into
# .inductor_cache/ (git-ignored) before part 2, it spares part 2 the compiles part 1 already did.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rotatek_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor_cache TRITON_CACHE_DIR=$PWD/.inductor_cache/triton
part=${1:-1}
started=$SECONDS

if [ "$part" = 1 ]; then
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_model.py tests/test_cuda_prefill.py \
    tests/test_cuda_static.py tests/test_triton_decode.py tests/test_compress_layers.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  echo "tests done at $((SECONDS - started)) s"
  timeout 60 python3 benchmarks/compress_cost.py --lengths 16384,65536 --reps 5 --out "$OUT" 2>&1 | tee "$OUT/compress_cost.log"
  echo "compression cost done at $((SECONDS - started)) s"
  timeout $((540 - (SECONDS - started))) python3 benchmarks/model_decode.py --out "$OUT" --steps 64 \
    --cases 1x16384,1x65536 --backends rotatek-static,eager 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -40
  tar czf "$OUT/inductor_cache.tgz" .inductor_cache 2>/dev/null
else
  timeout $((560 - (SECONDS - started))) python3 benchmarks/model_decode.py --out "$OUT" --steps 64 \
    --cases 1x131072,8x32768 --backends rotatek-static,static,eager --max-batch 65536 --max-batch-limit 32 \
    2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -40
fi
echo "part $part done at $((SECONDS - started)) s"
ls -la "$OUT"
