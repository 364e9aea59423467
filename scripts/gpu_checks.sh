#!/usr/bin/env bash
# All GPU checks in one script (docs/BENCHMARKS.md, "Running the checks on a GPU"). Sections:
#   dispatch  the model / dispatch tests under the GPU machine's JAX (0.11.x,
#             CUDA), then the MoE dispatch benchmark (default shape in float32
#             and bfloat16, one DeepSeekMoE-16B-sized layer in bfloat16); ~10 min;
#   kernels   the Pallas kernel tests (Triton kernels compiled on the GPU;
#             the TPU kernels only through their lowering tests), then scripts/bench_kernels.py
#             at the 16B and 2B shapes in bfloat16: the kernels timed against ragged_dot and a
#             dense matmul, checked against ragged_dot in float32, a tiling sweep (tm x warps x
#             stages), and the routed layer; ~6 min;
#   all       both (too long for one 10-minute device command: run them apart).
# Usage (repo root, on a machine with a GPU): bash scripts/gpu_checks.sh [OUTDIR] [SECTION]
# Every step writes as it goes: its output to OUTDIR/<step>.log, the tests' results to
# OUTDIR/junit_<step>.xml, the benchmarks' rows to OUTDIR/*.json; a step that runs past its
# time limit gets SIGINT first, so pytest still writes its summary and junit file.
# ml_collections is carried as a wheel in .whl/ where the machine lacks it.
set -u
out=${1:-${OUT:-/tmp/gpu_checks}}
section=${2:-all}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1

# step NAME SECONDS CMD...: CMD under a time limit (SIGINT, then SIGKILL 20 s later), its
# output into $out/NAME.log and the last lines to the console.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout -s INT -k 20 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit status $? ($name)" >> "$out/$name.log"
  tail -20 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

dispatch_checks() {
  step tests_dispatch 240 python3 -m pytest -q -p no:cacheprovider \
    --junitxml="$out/junit_tests_dispatch.xml" tests/test_router.py tests/test_losses.py \
    tests/test_moe.py tests/test_model.py tests/test_dispatch.py
  step bench_moe_f32 120 python3 scripts/bench_moe.py --reps 30 --slow-reps 5 --other-strategy \
    --json "$out/moe_f32.json"
  step bench_moe_bf16 120 python3 scripts/bench_moe.py --reps 30 --slow-reps 5 --other-strategy \
    --dtype bfloat16 --json "$out/moe_bf16.json"
  # the 16B layer: 16384 tokens, d 2048, 64 experts of 1408, top-6
  step bench_moe_16b_bf16 150 python3 scripts/bench_moe.py --tokens 16384 --d-model 2048 \
    --experts 64 --expert-hidden 1408 --top-k 6 --dtype bfloat16 --other-strategy --reps 20 \
    --slow-reps 3 --only flat_expert_ffn,capacity,capacity_loop,dropless_blocked,dropless_blocked_loop,dropless_ragged_dot,naive_ragged_dot \
    --json "$out/moe_16b_bf16.json"
}

kernel_checks() {
  # the Triton kernels compiled on the GPU; the interpreted Mosaic cases skipped
  step tests_kernels 180 python3 -m pytest -q -p no:cacheprovider \
    --junitxml="$out/junit_tests_kernels.xml" tests/test_pallas_gmm.py tests/test_pallas_export.py \
    "tests/test_moe.py::test_dropless_equals_dense_forward_and_gradients" \
    -k "not mosaic and not bench_kernels"
  # 16B: 16384 tokens x top-6, d 2048, 64 experts of 1408; 2B: top-7, d 1280, 63 of 880
  step bench_kernels_16b 210 python3 scripts/bench_kernels.py --shape 16b --reps 20 \
    --json "$out/kernels_16b.json"
  step bench_kernels_2b 120 python3 scripts/bench_kernels.py --shape 2b --reps 20 \
    --json "$out/kernels_2b.json"
}

case "$section" in
  dispatch) dispatch_checks ;;
  kernels) kernel_checks ;;
  all) dispatch_checks; kernel_checks ;;
  *) echo "unknown section '$section': use dispatch, kernels or all" >&2; exit 2 ;;
esac
