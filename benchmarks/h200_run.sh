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
#                                      # (one compile; 32 steps; does not fit 10 minutes: use a, b, base)
#   bash benchmarks/h200_run.sh a      # rotatek-static, 32 layers: B1 x 16k and B8 x 32k (32 steps)
#   bash benchmarks/h200_run.sh b      # rotatek-static, 32 layers: B1 x 64k and B1 x 128k (32 steps)
#   bash benchmarks/h200_run.sh base   # the uncompressed recipes (eager, HF static) at those points
#   bash benchmarks/h200_run.sh compress  # compression cost, B1 x 16k (query_aware auto and True) and
#                                         # B8 x 32k, with profiles
#   bash benchmarks/h200_run.sh stack  # layers stacked in the compression: its GPU tests, its cost
#                                      # (B1 x 16k profiled, B8 x 32k), B1 x 16k: eager, rotatek-static
#   bash benchmarks/h200_run.sh fused  # the fused window shares and covariances: their GPU tests, the
#                                      # compression's cost (B1 x 16k profiled, B8 x 32k; each with the
#                                      # eager statistics too), B1 x 16k: eager, rotatek-static (profiled)
#   bash benchmarks/h200_run.sh fused-timing  # the same without the GPU tests
#   bash benchmarks/h200_run.sh b8     # rotatek-static, 32 layers, B8 x 32k alone (its compile: ~6 minutes)
#   bash benchmarks/h200_run.sh batch [RECIPES [GUESS]]  # the largest batch of 64k-token prompts, by
#                                      # trying (default eager,rotatek-static: over 10 minutes), from GUESS
#   bash benchmarks/h200_run.sh ingraph  # compression inside the prefill graph: the GPU tests, then
#                                      # B1 x 16k: eager, rotatek-static (32 steps)
#   bash benchmarks/h200_run.sh overlap  # the compression without host reads: its GPU tests (and the
#                                      # CPU tests of the prefill run), then B1 x 16k: eager, rotatek-static,
#                                      # the prefill also timed with 1 and 4 pipelined groups
#   bash benchmarks/h200_run.sh long   # B1 x 64k and 128k: eager, rotatek-static (the groups are not
#                                      # pipelined there: every layer's copy does not fit in 4 GiB)
#   bash benchmarks/h200_run.sh kernel [BASELINE]  # the decode attention kernel: its GPU tests and the
#                                      # StaticCache + CUDA-graph tests, then the kernel's variants at B1 x {16k,
#                                      # 128k}, B4 and B32 x 16k (and BASELINE, another triton_decode.py)
#   bash benchmarks/h200_run.sh diagnose  # 8 layers, 16k: the compression of the model's own inputs
#                                         # timed inside and outside the model, and profiled
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rotatek_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package, where it is not installed
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
  a|b|base)
    cases=$([ "$part" = b ] && echo 1x65536,1x131072 || echo 1x16384,8x32768)
    recipes=rotatek-static
    if [ "$part" = base ]; then cases=1x16384,1x65536,1x131072,8x32768; recipes=eager,static; fi
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases "$cases" \
      --backends "$recipes" --solver-log 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -12 ;;
  stack)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_prefill.py tests/test_compress_layers.py \
      tests/test_cuda_static.py tests/test_cuda_model.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
    timeout 100 python3 benchmarks/compress_cost.py --lengths 16384 --reps 10 --profile --out "$OUT/b1" 2>&1 \
      | tee "$OUT/compress_cost_b1.log" | grep -A14 "^ *N "
    timeout 100 python3 benchmarks/compress_cost.py --lengths 32768 --batch 8 --reps 3 --out "$OUT/b8" 2>&1 \
      | tee "$OUT/compress_cost_b8.log" | grep -A1 "^ *N "
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 1x16384 \
      --backends eager,rotatek-static --solver-log 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -8 ;;
  fused|fused-timing)
    [ "$part" = fused ] && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_compress.py tests/test_cuda_prefill.py \
      tests/test_compress_layers.py tests/test_cuda_static.py tests/test_cuda_model.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
    timeout 100 python3 benchmarks/compress_cost.py --lengths 16384 --reps 10 --profile --out "$OUT/b1" 2>&1 \
      | tee "$OUT/compress_cost_b1.log" | grep -A14 "^ *N "
    timeout 100 python3 benchmarks/compress_cost.py --lengths 32768 --batch 8 --reps 3 --out "$OUT/b8" 2>&1 \
      | tee "$OUT/compress_cost_b8.log" | grep -A1 "^ *N "
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 1x16384 \
      --backends eager,rotatek-static --solver-log --profile 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" \
      | grep -A3 "compression:\|recipe |" ;;
  ingraph)
    timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_prefill.py tests/test_prefill_in_graph.py \
      tests/test_triton_compress.py tests/test_cuda_static.py tests/test_cuda_model.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 1x16384 \
      --backends eager,rotatek-static --solver-log 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -6 ;;
  overlap)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_prefill_in_graph.py \
      tests/test_compress_layers.py tests/test_reference.py tests/test_model_decode.py \
      "tests/test_cuda_prefill.py::test_the_compression_queues_its_work_without_waiting_for_the_device" \
      "tests/test_cuda_prefill.py::test_layers_stacked_as_rows_equal_layers_alone_on_cuda" \
      "tests/test_cuda_prefill.py::test_fused_statistics_give_the_reference_cache_on_cuda" > "$OUT/gpu_tests.log" 2>&1
    tail -12 "$OUT/gpu_tests.log"
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 1x16384 \
      --backends eager,rotatek-static --pipelined-groups 1,4 2>&1 | grep -v "^\s*$" \
      | tee "$OUT/model_decode.log" | tail -8 ;;
  long)
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 1x65536,1x131072 \
      --backends eager,rotatek-static 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -8 ;;
  b8)
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --steps 32 --cases 8x32768 \
      --backends rotatek-static --solver-log 2>&1 | grep -v "^\s*$" | tee "$OUT/model_decode.log" | tail -6 ;;
  batch)
    timeout "$(left 590)" python3 benchmarks/model_decode.py --out "$OUT" --cases none --max-batch 65536 \
      --backends "${2:-eager,rotatek-static}" --max-batch-guess "${3:-0}" 2>&1 | grep -v "^\s*$" | tee "$OUT/max_batch.log" | tail -12 ;;
  kernel)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_triton_decode.py \
      tests/test_cuda_static.py > "$OUT/gpu_tests.log" 2>&1
    tail -8 "$OUT/gpu_tests.log"
    timeout "$(left 560)" python3 benchmarks/decode_kernel.py --out "$OUT" --cases 1x16384,1x131072,4x16384,32x16384 \
      ${2:+--baseline "$2"} 2>&1 | tee "$OUT/decode_kernel.log" | tail -40 ;;
  diagnose)
    timeout "$(left 560)" python3 benchmarks/model_decode.py --out "$OUT" --layers 8 --steps 4 --cases 1x16384 \
      --backends rotatek,rotatek-static --profile 2>&1 | grep -v "^\s*$" | tee "$OUT/diagnose.log" \
      | grep -A24 "compression:" ;;
  compress)
    timeout 120 python3 benchmarks/compress_cost.py --lengths 16384 --profile --out "$OUT/b1" 2>&1 \
      | tee "$OUT/compress_cost_b1.log" | head -4
    timeout 120 python3 benchmarks/compress_cost.py --lengths 16384 --profile --query-aware true \
      --out "$OUT/b1_query_aware" 2>&1 | tee "$OUT/compress_cost_b1_query_aware.log" | head -4
    timeout 200 python3 benchmarks/compress_cost.py --lengths 32768 --batch 8 --reps 3 --profile \
      --out "$OUT/b8" 2>&1 | tee "$OUT/compress_cost_b8.log" | head -4 ;;
esac
echo "part $part done at $((SECONDS - started)) s"
