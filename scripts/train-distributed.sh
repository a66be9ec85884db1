#!/usr/bin/env bash
# Data-parallel training with fairseq's own engine (torch.distributed; gradients all-reduced every update)
# over NPROC processes on this node, CPU processes or one per GPU, and over several nodes. The script starts
# one fairseq-train per rank with fairseq's standard flags (--distributed-world-size, --distributed-rank,
# --distributed-init-method tcp://MASTER_ADDR:MASTER_PORT, --distributed-no-spawn), which works on CPU and
# GPU alike: fairseq's own spawning starts one process per visible GPU (none on a CPU machine), and torchrun's
# env:// path computes rank % torch.cuda.device_count().
#
# Usage: bash scripts/train-distributed.sh NPROC DATA [fairseq-train flags...]
#   bash scripts/train-distributed.sh 2 data/brown/data-bin --user-dir grnn_fairseq --task language_modeling \
#       --arch group_lstm_lm_brown --batch-size 16 ... --save-dir checkpoints/lm-2proc
#
# Every update sums the gradients of all NPROC x NNODES processes, each on its own --batch-size (or
# --max-tokens) x --update-freq: to keep a one-process recipe's total batch, divide --update-freq (or the
# batch) by the number of processes. Run the same command again to resume from checkpoint_last.pt.
#
# Environment (all optional):
#   DEVICE       cpu or cuda (default: cuda when torch sees a GPU and --cpu is not given, else cpu).
#                cpu: --cpu, gloo, --ddp-backend legacy_ddp (fairseq's pytorch_ddp fails on CPU) and
#                OMP_NUM_THREADS = cores / NPROC unless set. cuda: nccl, process i on GPU i (--device-id i).
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free port when NNODES is 1):
#                several nodes: run this script on every node with the same NPROC, NNODES, MASTER_ADDR (the
#                address of node 0, reachable from all of them) and MASTER_PORT, and NODE_RANK 0..NNODES-1.
#   LOG_DIR      where ranks other than 0 write their output (default SAVE_DIR/distributed-logs, SAVE_DIR
#                being --save-dir or fairseq's default "checkpoints"); rank 0 writes to this terminal.
#   PYTHON, FAIRSEQ_BIN  as in scripts/lib.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
grnn_init train-distributed

(( $# >= 2 )) || die "usage: bash scripts/train-distributed.sh NPROC DATA [fairseq-train flags...]"
NPROC="$1"
DATA="$2"
shift 2
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
if [[ -z "${MASTER_PORT:-}" ]]; then
    (( NNODES == 1 )) || die "set MASTER_PORT (the same free port on every node) when NNODES > 1"
    MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

save_dir=checkpoints
want_cpu=0
args=("$@")
for (( i = 0; i < ${#args[@]}; i++ )); do
    case "${args[i]}" in
        --save-dir) save_dir="${args[i + 1]:-$save_dir}" ;;
        --save-dir=*) save_dir="${args[i]#--save-dir=}" ;;
        --cpu) want_cpu=1 ;;
    esac
done
if [[ -z "${DEVICE:-}" ]]; then
    DEVICE=cpu
    if (( ! want_cpu )) && [[ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" != 0 ]]; then
        DEVICE=cuda
    fi
fi
world=$(( NNODES * NPROC ))
device_flags=()
case "$DEVICE" in
    cpu)
        device_flags=(--cpu --distributed-backend gloo --ddp-backend legacy_ddp)
        cores="$(nproc 2>/dev/null || echo 1)"
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}"
        ;;
    cuda)
        device_flags=(--distributed-backend nccl)
        ;;
    *) die "DEVICE must be cpu or cuda, got '$DEVICE'" ;;
esac
LOG_DIR="${LOG_DIR:-$save_dir/distributed-logs}"
mkdir -p "$LOG_DIR"
train="$(fairseq_tool fairseq-train)"

log "$NPROC processes on node $NODE_RANK of $NNODES ($DEVICE), world size $world, tcp://$MASTER_ADDR:$MASTER_PORT"
pids=()
ranks=()
stop_all() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap 'stop_all; exit 130' INT TERM
for (( i = 0; i < NPROC; i++ )); do
    rank=$(( NODE_RANK * NPROC + i ))
    flags=(--distributed-world-size "$world" --distributed-rank "$rank" --distributed-no-spawn
           --distributed-init-method "tcp://$MASTER_ADDR:$MASTER_PORT" "${device_flags[@]}")
    [[ "$DEVICE" == cuda ]] && flags+=(--device-id "$i")
    if (( rank == 0 )); then
        "$train" "$DATA" "${flags[@]}" "$@" &
    else
        log "rank $rank -> $LOG_DIR/rank$rank.log"
        "$train" "$DATA" "${flags[@]}" "$@" > "$LOG_DIR/rank$rank.log" 2>&1 &
    fi
    pids+=("$!")
    ranks+=("$rank")
done

# The first process to fail stops the others: a rank that died leaves the rest blocked in a collective.
running=$NPROC
declare -A finished=()
while (( running > 0 )); do
    for i in "${!pids[@]}"; do
        pid="${pids[i]}"
        [[ -n "${finished[$pid]:-}" ]] && continue
        kill -0 "$pid" 2>/dev/null && continue
        status=0
        wait "$pid" || status=$?
        finished[$pid]=1
        running=$(( running - 1 ))
        if (( status != 0 )); then
            stop_all
            rank="${ranks[i]}"
            if (( rank != 0 )); then
                tail -n 20 "$LOG_DIR/rank$rank.log" >&2 || true
            fi
            die "rank $rank exited with status $status; stopped the other processes (logs: $LOG_DIR)"
        fi
    done
    (( running > 0 )) && sleep 0.5
done
log "all $NPROC processes finished"
