#!/usr/bin/env bash
# The GPU checks, as one device command (prepare .whl/ here first with benchmarks/gpu/wheels.sh):
#   run: command "bash benchmarks/gpu/run.sh bench restore", carry [".whl"], timeout_s 580
#   then: command "bash benchmarks/gpu/run.sh tests", carry [".whl"], timeout_s 330
#   then: command "bash benchmarks/gpu/run.sh recipe", carry [".whl"] (and ".recipe-work"), timeout_s 580
# Parts, in the order given: tests (the CUDA tests: the deblur job on fractional GPUs and a short
# training recipe on the card), bench (benchmarks.deblur_pipeline --device cuda), restore
# (benchmarks.restore_throughput --device cuda: fp32, bf16, compile, compile + bf16, each against fp32
# and the card's matmul peak: the default path's frames/s per card), recipe (the `gpu` default-weights recipe; its
# weights, held-out numbers and finished stages come back in $OUT).
# Logs, JSON and status.txt (each part's exit status and seconds) land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/adarevd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
site=/tmp/adarevd-site
if [ ! -d "$site/ray" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  python3 benchmarks/gpu/wheelhouse.py unpack .whl/ray-*.slim.zip "$site" || exit 1
fi
export PYTHONPATH="$site:$PWD"
{ nvidia-smi -L; python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/machine.txt"

# part NAME LIMIT_S COMMAND...: a part past its limit is stopped (rc 124) and the next one runs, so
# one slow part does not take the whole device call with it.
part() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (at most $limit s): $*"
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/status.txt"
}

for what in "$@"; do
  case $what in
    tests) part tests "${TESTS_LIMIT_S:-270}" env ADAREVD_TEST_DEVICE=cuda \
             python3 -m pytest -q -p no:cacheprovider \
             tests/test_deblur_gpu.py tests/test_default_weights.py tests/test_training.py \
             "tests/test_train.py::test_one_worker_asked_for_a_gpu_trains_on_it_or_is_refused_where_there_is_none" ;;
    bench) part bench "${BENCH_LIMIT_S:-270}" \
             python3 -m benchmarks.deblur_pipeline --device cuda --frames 96 --size 640x360 --repeats 2
           cp benchmarks/results/deblur_pipeline_gpu.json "$OUT/" 2>/dev/null ;;
    restore) part restore "${RESTORE_LIMIT_S:-240}" \
               python3 -m benchmarks.restore_throughput --device cuda --frames 4 --modes fp32 bf16 compile compile_bf16
             cp benchmarks/results/restore_throughput_nafnet_cuda.json "$OUT/" 2>/dev/null ;;
    recipe) # Finished stages land in $OUT/recipe-work, which comes back even if the call is cut short:
            # put them in .recipe-work/ here and carry it, and the next call starts after them.
            mkdir -p "$OUT/recipe-work"; [ -d .recipe-work ] && cp .recipe-work/*.safetensors "$OUT/recipe-work/"
            part recipe "${RECIPE_LIMIT_S:-540}" \
              python3 -m jobs.cli make-default-weights --recipe gpu --device cuda \
              --work "$OUT/recipe-work" --output "$OUT/adarevd-tiny-gpu.safetensors" ;;
    *) echo "unknown part $what (tests, bench, restore, recipe)"; exit 2 ;;
  esac
done
