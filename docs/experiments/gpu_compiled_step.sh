#!/usr/bin/env bash
# The GPU runs issue 14's compiled training step still needs (docs/experiments.md, "The compiled step on an H200" and
# "The step on an H200 is host-bound"),
# as one script for a lent GPU machine: `vla bench train rows=[vla]` (the vla stage eager twice, then compiled) on
# CUDA for each row, its log under OUT_DIR (default outputs/gpu_compiled_step), the table and JSON line of each on
# stdout; each row stops after ROW_TIMEOUT seconds (default 300), so that one slow row leaves time for the others.
# Every row draws its batches in DATA_WORKERS processes (default 4; the trainer's data_workers): on an H200 the
# batch, drawn on the training process, was 0.06-0.09 s of a ~0.2 s step.
#   fp32: fp32, torch.compile's default mode;
#   bf16: bf16 autocast (the trainer's GPU precision), with its eager floor (`eager_repeat_max_loss_diff`): the 1e-4
#         criterion can only be read in bf16 against it;
#   fp32_graphs: fp32 with CUDA graphs (`reduce-overhead`); on 2026-12-04 per-block graphs did not replay in training
#         ("pending, uninvoked backwards"): 0.42x;
#   fp32_autotune: fp32 with `max-autotune`;
#   profile: docs/experiments/step_profile.py --device cuda, eager then compiled (the step's phases, the batch apart,
#         and the kernel-launch table), to read against docs/experiments/h200_2026-12-04/;
#   graphs_per_block: step_profile.py --device cuda --compile dynamic --mode reduce-overhead --graph-per-block: each
#         block instance its own graph, so each its own CUDA graph (whether per-block graphs then replay in training;
#         the 8 replayed batches bound the shapes). Compiling took 191 s on the CPU against 50 s shared: give it
#         ROW_TIMEOUT=500 and few other rows.
# Usage, on a machine with a CUDA GPU and the project importable:
#   [PYTHON=python3] [ROW_TIMEOUT=300] [DATA_WORKERS=4] bash docs/experiments/gpu_compiled_step.sh [OUT_DIR] [ROWS...]
#   ROWS: fp32 bf16 fp32_graphs fp32_autotune profile graphs_per_block (default: fp32 bf16 profile)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/gpu_compiled_step}
shift || true
rows=${*:-fp32 bf16 profile}
mkdir -p "$out"
py=${PYTHON:-python3}  # the interpreter with the project importable
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')" || exit 1
for row in $rows; do
    if [ "$row" = profile ]; then
        for c in none dynamic; do
            echo "== profile: step_profile.py --device cuda --compile $c"
            timeout "${ROW_TIMEOUT:-300}" "$py" docs/experiments/step_profile.py --device cuda --reps 3 --profile \
                --compile $c > "$out/step_profile_$c.txt" 2>&1
            tail -1 "$out/step_profile_$c.txt"
        done
        continue
    fi
    if [ "$row" = graphs_per_block ]; then
        echo "== graphs_per_block: step_profile.py --device cuda --compile dynamic --mode reduce-overhead --graph-per-block"
        timeout "${ROW_TIMEOUT:-300}" "$py" docs/experiments/step_profile.py --device cuda --reps 3 --compile dynamic \
            --mode reduce-overhead --graph-per-block > "$out/step_profile_graphs_per_block.txt" 2>&1
        grep -i "cudagraph\|^{" "$out/step_profile_graphs_per_block.txt" | tail -4
        continue
    fi
    case "$row" in
        fp32) args="precision=fp32" ;;
        bf16) args="precision=bf16" ;;
        fp32_graphs) args="precision=fp32 compile_mode=reduce-overhead" ;;
        fp32_autotune) args="precision=fp32 compile_mode=max-autotune" ;;
        *) echo "unknown row $row (fp32, bf16, fp32_graphs, fp32_autotune, profile, graphs_per_block)" >&2; exit 2 ;;
    esac
    args="$args data_workers=${DATA_WORKERS:-4}"
    echo "== $row: vla bench train device=cuda rows=[vla] $args"
    # shellcheck disable=SC2086
    timeout "${ROW_TIMEOUT:-300}" "$py" -m vla.cli bench train device=cuda "rows=[vla]" $args 2>&1 | tee "$out/$row.log" \
        | grep -v "^W[0-9]" | tail -8
done
