#!/usr/bin/env bash
# The GPU half of the checks, in one call on the device machine (repo root, torch with CUDA):
# the whole pytest suite on the GPU, the GPU tests again under compute-sanitizer memcheck, then
# the benchmark; on request the training benchmark and the two serving examples (their tokens/s).
# Logs and bench results go to $OUT (or bench_results/ when OUT is unset).
# Usage: bash python/gpu_suite.sh [tests|sanitizer|bench|decode|training|examples]...
#        (default: tests sanitizer bench)
#        BENCH_ARGS='--time-budget 200' bash python/gpu_suite.sh bench   (arguments for bench.py)
#        PYTEST_ARGS='-n 8' bash python/gpu_suite.sh tests               (arguments for pytest)
set -uo pipefail
out=${OUT:-bench_results}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
for step in "${@:-tests sanitizer bench}"; do
  for part in $step; do
    case $part in
      tests) python3 -m pytest -q -p no:logging ${PYTEST_ARGS:-} tests 2>&1 | tee "$out/gpu_tests.txt" | tail -15 || status=1 ;;
      sanitizer) compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:logging \
          tests/test_parity.py tests/test_cuda_graphs.py -k "real_sizes or replay" 2>&1 \
          | tee "$out/sanitizer.txt" | tail -6 || status=1 ;;
      bench) python3 python/bench.py ${BENCH_ARGS:-} 2>&1 | tee "$out/bench_log.txt" | tail -60 || status=1 ;;
      decode) python3 python/bench_decode.py --profile 1 32 2>&1 | tee "$out/bench_decode.txt" | tail -40 || status=1 ;;
      training) python3 python/bench_training.py 2>&1 | tee "$out/bench_training.txt" | tail -20 || status=1 ;;
      examples) for example in peft_model cuda_graph_decode train_mixed_adapters; do
          python3 examples/$example.py 2>&1 | tee "$out/$example.txt" | tail -12 || status=1
        done ;;
    esac
  done
done
exit $status
