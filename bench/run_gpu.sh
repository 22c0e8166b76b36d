#!/usr/bin/env bash
# The lent-GPU session script: install the carried wheels (this project built by `bench/run_gpu.sh --build` here,
# plus monai / einops / nibabel, which the GPU image lacks), run the GPU check table and the GPU tests.
#   here:   bash bench/run_gpu.sh --build          (fills wheelhouse/ with the project's wheel and the pinned monai,
#                                                  einops and nibabel ones; the device call carries it)
#   there:  bash bench/run_gpu.sh                  (writes into $OUT, or bench/gpu_results)
#   then:   bash bench/run_gpu.sh --tune [KIND..]  (times the window-attention launch configs: fwd, bwd, bias)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--build" ]; then
    rm -f wheelhouse/*.whl
    python -m pip wheel -q --no-deps --no-build-isolation -w wheelhouse . &&
        python -m pip download -q --no-deps -d wheelhouse -c requirements/constraints-cpu.txt monai einops nibabel &&
        ls -la wheelhouse
    exit $?
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheelhouse/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-bench/gpu_results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "${1:-}" = "--tune" ]; then
    shift
    timeout "${GPU_TUNE_TIMEOUT:-540}" python3 bench/tune_window_attention.py --time ${1:+--kinds "$@"} \
        --json "$out/tune.json" 2>&1 | tee "$out/tune.log"
    exit "${PIPESTATUS[0]}"
fi
timeout "${GPU_CHECK_TIMEOUT:-330}" python3 bench/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
# -P: the repo root must not shadow the installed wheel (its medmap_fast/ has no kernels/ subpackage)
timeout "${GPU_TEST_TIMEOUT:-150}" python3 -P -m pytest tests/ -q -p no:cacheprovider -m gpu 2>&1 | tee "$out/gpu_tests.log"
