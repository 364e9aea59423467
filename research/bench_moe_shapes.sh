#!/bin/bash
# The CPU routed-expert benchmarks in one call: the layer (forward+backward,
# float32) at four shapes, and the whole-model --model comparison.
# Usage: bash research/bench_moe_shapes.sh OUTDIR [extra bench_moe.py flags]
# (about 10 minutes on 2 idle cores; JSON per part in OUTDIR, tables on stdout).
# Extra flags go to every layer run, e.g. --strategy kernel.
set -euo pipefail
out=${1:?usage: bash research/bench_moe_shapes.sh OUTDIR [flags]}
shift
mkdir -p "$out"
py=${PYTHON:-python}
cases=dense_ffn,flat_expert_ffn,capacity,capacity_score,dropless_blocked,naive_onehot_einsum
run() { echo "=== $1"; shift; "$py" scripts/bench_moe.py "$@" 2>&1 | grep -v -i warn; }
run "default: 4096 tokens, d 512, 64 experts x 256, top-6" --only $cases --json "$out/default.json" "$@"
run "wider: 16 experts x 768, top-2" --experts 16 --expert-hidden 768 --top-k 2 --only $cases --json "$out/wider.json" "$@"
run "narrower: 128 experts x 128, top-12" --experts 128 --expert-hidden 128 --top-k 12 --only $cases --json "$out/narrower.json" "$@"
run "ablation layer: 2048 tokens, d 128, 63 experts x 88, top-7" --tokens 2048 --d-model 128 --experts 63 --expert-hidden 88 --top-k 7 --only $cases --json "$out/ablation.json" "$@"
run "whole model" --model ablation:deepseekmoe,ablation:gshard --extra ablation:dense --model-steps 10 --json "$out/model.json"
