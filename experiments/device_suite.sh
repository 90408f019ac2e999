#!/usr/bin/env bash
# Device suite (issue 19): the three measurements a GPU session should repeat, in one command, sized for
# one GPU within 8 minutes:
#   1. bench_engine.py      idjax per-example gradients and JVP embeddings vs PyTorch (batch-1 loop, torch.func)
#   2. torch_compare.py     idjax select_samples vs a PyTorch implementation: seconds and score agreement
#   3. selection_study.py   --cost-only: Influence Distillation with landmarks vs --exact, selection seconds
# Each part writes its JSON into OUT_DIR (none appends to RESULTS.md); device_suite_report.py then writes
# OUT_DIR/suite.json (every part, machine, versions, commands, wall seconds) and OUT_DIR/suite.md (the
# headline table). --small: tiny settings that finish in a few minutes on a 2-core CPU, so the test suite
# can run the whole chain (tests/test_device_suite.py). The torch baselines use CUDA when torch sees a GPU.
#
#     bash experiments/device_suite.sh OUT_DIR [--small]
#
# Exits non-zero as soon as a part fails; its log is OUT_DIR/<part>.log. PYTHON overrides the interpreter.
set -euo pipefail

usage() {
    echo "usage: bash experiments/device_suite.sh OUT_DIR [--small]" >&2
    exit 2
}

out="" small=0
for arg in "$@"; do
    case "$arg" in
        --small) small=1 ;;
        -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "device_suite: unknown option $arg" >&2; usage ;;
        *) [[ -z "$out" ]] || usage; out=$arg ;;
    esac
done
[[ -n "$out" ]] || usage

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
suite_command="bash experiments/device_suite.sh $*"

if ((small)); then
    mode=small
    bench_args=(--samples 4 --proj-dim 256 --params norm --repeats 1 --torch-threads 1)
    compare_args=(--limit 6 --target-limit 4 --landmarks 2 --calls 1 --proj-dim 512 --max-length 64 --torch-threads 1)
    study_args=(--pool-limit 16 --max-length 64 --warmup-steps 1 --tasks code --target-limit 2)
else
    mode=full
    bench_args=(--samples 64 --proj-dim 1024 --params 'mlp\.down_proj' --repeats 3)
    compare_args=(--limit 128 --calls 2)
    study_args=(--pool-limit 879 --tasks code)
fi

# Results of an earlier run must not pass for this one's if a part fails.
parts=(bench_engine torch_compare selection_study)
for name in "${parts[@]}" suite; do
    rm -f "$out/$name.json" "$out/$name.log"
done
rm -f "$out/suite.md" "$out/parts.tsv"
# The HF copy of the model, idjax's array stores and the study's warmed-up checkpoint (~1.5 GB) live here.
scratch=$(mktemp -d "$out/scratch.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# bench_engine and torch_compare hold JAX and torch in one process: leave torch part of the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
# float32 against float32: JAX's GPU default would run float32 matmuls in TF32, torch's CUDA default does not.
export JAX_DEFAULT_MATMUL_PRECISION=${JAX_DEFAULT_MATMUL_PRECISION:-highest}
export PYTHONUNBUFFERED=1

run_part() {  # run_part NAME COMMAND...: log to OUT/NAME.log, record wall seconds and command in parts.tsv
    local name=$1
    shift
    echo "== device_suite ($mode): $name: $*"
    local start end status
    start=$(date +%s.%N)
    set +e
    "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    set -e
    end=$(date +%s.%N)
    if ((status != 0)); then
        echo "device_suite: part $name failed with exit status $status (log: $out/$name.log)" >&2
        exit "$status"
    fi
    printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" \
        "$(printf '%q ' "$@")" >>"$out/parts.tsv"
}

run_part bench_engine "$python" experiments/bench_engine.py "${bench_args[@]}" --no-record \
    --json "$out/bench_engine.json"
run_part torch_compare "$python" experiments/torch_compare.py "${compare_args[@]}" --hf-dir "$scratch/hf-smollm2" \
    --scratch-dir "$scratch" --no-record --json "$out/torch_compare.json"
# The study keeps its results in OUT/results.json (--cost-only never writes RESULTS.md); a fresh --out each run,
# since it would reuse a finished "cost" entry instead of measuring again.
run_part selection_study "$python" experiments/selection_study.py --out "$scratch/selection_study" "${study_args[@]}" \
    --cost-only --cost-methods influence,exact --cost-passes steady
cp "$scratch/selection_study/results.json" "$out/selection_study.json"

"$python" experiments/device_suite_report.py "$out" --mode "$mode" --command "$suite_command"
