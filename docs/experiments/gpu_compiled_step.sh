#!/usr/bin/env bash
# The GPU runs issue 14's compiled training step still needs (docs/experiments.md, "The compiled step on an H200"),
# as one script for a lent GPU machine: each `vla bench train` row on CUDA, its log under OUT_DIR (default
# outputs/gpu_compiled_step), the table and JSON line of each on stdout.
#   1. bf16 autocast (the trainer's GPU precision) again: its eager floor (`eager_repeat_max_loss_diff`) was never
#      measured, and the 1e-4 criterion can only be read in bf16 against it;
#   2. fp32 with CUDA graphs (`reduce-overhead`): the step is launch-bound at this size;
#   3. fp32 with `max-autotune`.
# Usage, on a machine with a CUDA GPU and the project importable:
#   [PYTHON=python3] bash docs/experiments/gpu_compiled_step.sh [OUT_DIR] [ROWS...]   # ROWS: bf16 fp32_graphs fp32_autotune
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/gpu_compiled_step}
shift || true
rows=${*:-bf16 fp32_graphs fp32_autotune}
mkdir -p "$out"
py=${PYTHON:-python3}  # the interpreter with the project importable
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')" || exit 1
for row in $rows; do
    case "$row" in
        bf16) args="precision=bf16" ;;
        fp32_graphs) args="precision=fp32 compile_mode=reduce-overhead" ;;
        fp32_autotune) args="precision=fp32 compile_mode=max-autotune" ;;
        *) echo "unknown row $row (bf16, fp32_graphs, fp32_autotune)" >&2; exit 2 ;;
    esac
    echo "== $row: vla bench train device=cuda $args"
    # shellcheck disable=SC2086
    "$py" -m vla.cli bench train device=cuda $args 2>&1 | tee "$out/$row.log" | grep -v "^W[0-9]" | tail -12
done
