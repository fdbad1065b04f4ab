#!/usr/bin/env bash
# Issue 12's measurements on one GPU, in sections sized to fit one device call each (10 minutes):
#   ceilings  the device's own bf16 matmul rate and copy bandwidth (bench/ceilings.py), ~20 s
#   gpt2      gpt2-124m at 32,768 tokens per step: the current step, profiled, then each lever
#             (cuDNN attention, the chunked loss, remat policies, the layer scan unrolled, XLA flags), ~8 min
#   1b        the 1b model on one GPU: remat policies and batch sizes, with the memory each holds, ~4 min
#   loss      the first 100 steps' losses of the current settings against the levers', ~3 min
# Every case is one `bench/throughput.py` run: timed steps, then 3 untimed traced steps broken
# down by op category (shardlib.analysis.step_profile), into OUT/<case>.json and OUT/<case>.log.
# No case starts once the section has run BUDGET_S seconds (default 400), and each is cut at
# CASE_TIMEOUT_S (140): a section ends inside 540 s, and the summary within the call's 600.
# Results: OUT/summary.txt (the tables, printed last) and OUT/results.tar.gz (every JSON and log,
# the compiled HLO of each case, the first case's trace): the device tool brings back 8 files.
# Usage: bash bench/gpu_throughput.sh OUT [section ...]   (default: ceilings gpt2)
#        SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_throughput.sh /tmp/smoke ceilings gpt2 1b loss:
#        the same plumbing on a CPU, with a tiny model (run it before spending device time).
#        device run: carry [".whl"] after `make gpu-wheels` here (the image lacks pydantic).
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_throughput}}
shift || true
sections=${*:-ceilings gpt2}
budget=${BUDGET_S:-400}
case_timeout=${CASE_TIMEOUT_S:-140}
work=/tmp/gpu_throughput_work
# name | key=value overrides | extra XLA_FLAGS
# In the order of what they tell: the current step, the levers together, then each change to that.
GPT2_CASES=(
    "base||"
    "fused_chunk|attention.impl=fused model.loss_chunk=128|"
    "fused_chunk_keepattn|attention.impl=fused model.loss_chunk=128 model.remat=save_matmuls_attention|"
    "fused_chunk_noremat|attention.impl=fused model.loss_chunk=128 model.remat=none|"
    "fused_chunk_unrolled|attention.impl=fused model.loss_chunk=128 model.scan_unroll=12|"
    "fused_chunk_cublas|attention.impl=fused model.loss_chunk=128|--xla_gpu_enable_triton_gemm=false"
    "fused_chunk_nographs|attention.impl=fused model.loss_chunk=128|--xla_gpu_enable_command_buffer="
    "fused_chunk_fullremat|attention.impl=fused model.loss_chunk=128 model.remat=full|"
    "fused|attention.impl=fused|"
    "chunk|model.loss_chunk=128|"
)
GPT2_ARGS="--config configs/gpt2-124m.yaml --mesh meshes/gpu-1.yaml --steps 20 --warmup 3 --trace-steps 3"
# One GPU: data parallelism of one, no accumulation; the loss in chunks so [B, L, V] is never whole.
B1_COMMON="sharding=dp grad_accum=1 attention.impl=fused model.loss_chunk=256"
B1_CASES=(
    "1b_full_b16|batch_size=16 model.remat=full $B1_COMMON|"
    "1b_matmuls_b16|batch_size=16 model.remat=save_matmuls $B1_COMMON|"
    "1b_full_b32|batch_size=32 model.remat=full $B1_COMMON|"
    "1b_matmuls_b32|batch_size=32 model.remat=save_matmuls $B1_COMMON|"
)
B1_ARGS="--config configs/1b.yaml --mesh meshes/gpu-1.yaml --steps 10 --warmup 2 --trace-steps 2"

LOSS_ARGS="--config configs/gpt2-124m.yaml --mesh meshes/gpu-1.yaml steps=100"
SMOKE_OVERRIDES=""
if [ -n "${SMOKE:-}" ]; then  # the plumbing on a CPU before device time is spent: a tiny model, 2 steps
    GPT2_ARGS="--config configs/tiny.yaml --mesh meshes/cpu-1.yaml --steps 2 --warmup 1 --trace-steps 1"
    B1_ARGS=$GPT2_ARGS
    SMOKE_OVERRIDES="model.n_layers=1 seq_len=256 batch_size=2"  # before each case's: a case's batch size wins
    LOSS_ARGS="--config configs/tiny.yaml --mesh meshes/cpu-1.yaml $SMOKE_OVERRIDES steps=3"
fi

if [ -n "${LIST_CASES:-}" ]; then  # the cases' command lines, for a test that every one is a valid config
    for case in "${GPT2_CASES[@]}"; do echo "$GPT2_ARGS|$case"; done
    for case in "${B1_CASES[@]}"; do echo "$B1_ARGS|$case"; done
    exit 0
fi
mkdir -p "$out" "$work"
source bench/gpu_env.sh

run_cases() {  # run_cases "ARGS" CASE...: each case's JSON, log, HLO and trace; stops at the budget
    local args=$1 start=$SECONDS first=1
    shift
    for case in "$@"; do
        IFS='|' read -r name overrides flags <<<"$case"
        if ((SECONDS - start > budget)); then
            echo "== $name: skipped (the section has run $((SECONDS - start)) s of its $budget)"
            continue
        fi
        echo "== $name: $overrides ${flags:+XLA_FLAGS+=$flags}"
        rm -rf "$work/$name"
        # XLA reads a value that does not start with "--" as a file name, so no stray blank.
        local xla_flags
        xla_flags=$(echo "${XLA_FLAGS:-} $flags" | xargs)
        # shellcheck disable=SC2086  # the options and overrides are words
        env ${xla_flags:+XLA_FLAGS="$xla_flags"} timeout "$case_timeout" $py bench/throughput.py $args \
            --json "$out/$name.json" --hlo "$work/$name/hlo" --trace "$work/$name/trace" \
            $SMOKE_OVERRIDES $overrides >"$out/$name.log" 2>&1
        local code=$?
        echo "   exit $code after $((SECONDS - start)) s"
        ((code)) && echo "$name: exit $code: $(grep -m1 -i 'error' "$out/$name.log" || tail -n 1 "$out/$name.log")" \
            >>"$out/failed.txt"
        tail -n 22 "$out/$name.log"
        [ $first = 1 ] && cp -r "$work/$name/trace" "$out/trace-$name" 2>/dev/null
        cp "$work/$name/hlo/train_step.hlo.txt" "$out/$name.hlo.txt" 2>/dev/null
        first=0
    done
}

table() {  # table TITLE CASE...: the side-by-side table of the cases that wrote a JSON
    local title=$1 files=()
    shift
    for case in "$@"; do
        [ -f "$out/${case%%|*}.json" ] && files+=("$out/${case%%|*}.json")
    done
    ((${#files[@]})) && { echo "## $title"; $py bench/throughput_table.py "${files[@]}"; echo; } >>"$out/summary.txt"
    [ -f "$out/failed.txt" ] && { echo "failed:"; cat "$out/failed.txt"; echo; } >>"$out/summary.txt" && rm "$out/failed.txt"
}

loss_run() {  # loss_run NAME OVERRIDES...: 100 steps of gpt2-124m, every loss logged
    local name=$1
    shift
    rm -rf "$work/run-$name"
    # shellcheck disable=SC2086
    timeout 200 $py train.py $LOSS_ARGS log_every=1 eval_every=0 checkpoint.every=0 run_dir="$work/run-$name" "$@" \
        >"$out/loss-$name.log" 2>&1
    cp "$work/run-$name/metrics.jsonl" "$out/loss-$name.jsonl" 2>/dev/null
}

: >"$out/summary.txt"
cat "$out/device.txt" >>"$out/summary.txt"
for section in $sections; do
    case $section in
    ceilings)
        $py bench/ceilings.py --json "$out/ceilings.json" | tee -a "$out/summary.txt"
        ;;
    gpt2)
        run_cases "$GPT2_ARGS" "${GPT2_CASES[@]}"
        table "gpt2-124m, 32,768 tokens per step" "${GPT2_CASES[@]}"
        ;;
    1b)
        run_cases "$B1_ARGS" "${B1_CASES[@]}"
        table "1b on one GPU" "${B1_CASES[@]}"
        ;;
    loss)
        loss_run current
        loss_run levers attention.impl=fused model.loss_chunk=128
        $py bench/compare_losses.py "$out/loss-current.jsonl" "$out/loss-levers.jsonl" | tee -a "$out/summary.txt"
        ;;
    *) echo "unknown section $section (ceilings, gpt2, 1b, loss)" >&2 ;;
    esac
done

# Bring back at most 8 files: everything in one archive, and the summary beside it.
(cd "$out" && tar czf /tmp/results.tar.gz --exclude=results.tar.gz . && mv /tmp/results.tar.gz results.tar.gz)
if [ "$(stat -c %s "$out/results.tar.gz")" -gt 15000000 ]; then  # over 16 MiB a file: keep one HLO only
    ls "$out"/*.hlo.txt | tail -n +2 | xargs rm -f
    (cd "$out" && tar czf /tmp/results.tar.gz --exclude=results.tar.gz . && mv /tmp/results.tar.gz results.tar.gz)
fi
find "$out" -mindepth 1 -maxdepth 1 ! -name results.tar.gz ! -name summary.txt -exec rm -rf {} +
echo
cat "$out/summary.txt"
