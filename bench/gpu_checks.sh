#!/usr/bin/env bash
# The checks only a GPU can answer, in one go (about 5 minutes on one H100/H200):
#   1. gpt2-124m trained for 100 steps on one GPU: tokens/s and MFU (metrics.jsonl), with the
#      default einsum attention, with attention.impl=fused (cuDNN flash), and fused without remat;
#   2. the pipeline executor's single-device overhead against the plain model;
#   3. ring attention's single-device overhead against dense attention.
# Usage: bash bench/gpu_checks.sh [OUT_DIR] [gpt2|pipeline|ring ...]   (default: all; needs jax with CUDA)
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_checks}}
shift || true
only=" ${*:-gpt2 pipeline ring} "
mkdir -p "$out"
source bench/gpu_env.sh

if [[ $only == *" gpt2 "* ]]; then
    for variant in "einsum:" "fused:attention.impl=fused" "fused-noremat:attention.impl=fused model.remat=none"; do
        name=${variant%%:*}
        echo "== gpt2-124m, 100 steps, $name"
        rm -rf /tmp/gpt2-run
        $py train.py --config configs/gpt2-124m.yaml --mesh meshes/gpu-1.yaml steps=100 run_dir=/tmp/gpt2-run \
            log_every=10 eval_every=0 checkpoint.every=0 ${variant#*:} 2>&1 | tail -3 | tee "$out/gpt2-$name.txt"
        tail -2 /tmp/gpt2-run/metrics.jsonl | tee -a "$out/gpt2-$name.txt"
    done
fi

if [[ $only == *" pipeline "* ]]; then
    echo "== pipeline executor overhead"
    $py bench/pipeline_overhead.py --config configs/gpt2-124m.yaml --batch-size 16 --seq-len 1024 \
        --microbatches 4 2>&1 | tail -8 | tee "$out/pipeline_overhead.txt"
fi

if [[ $only == *" ring "* ]]; then
    echo "== ring attention overhead"
    $py bench/ring_attention.py --gpu-overhead 2>&1 | tail -20 | tee "$out/ring_overhead.txt"
fi
