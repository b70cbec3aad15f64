#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous: run this same script on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.example RUN_DIR=/shared/runs/1b \
#       scripts/torchrun_multinode.sh --preset 1b --data /shared/data/code
#
# - MASTER_ADDR: a host every node can reach (usually node 0); MASTER_PORT: a free TCP port on it.
# - RUN_DIR must be on a filesystem all nodes share: FSDP checkpoints are written by every rank into
#   the same staging directory, and every rank reads the data cache.
# - --resume is passed once RUN_DIR holds a run (its config.toml): a fresh run directory starts at step 0,
#   a preempted one continues from its newest intact checkpoint, so the same command serves first start
#   and every restart (train refuses --resume where there is no run, and a new run where there is one).
# - RDZV_ID must be the same on all nodes and different for concurrent jobs.
# - The exit code is the workers' documented one (codegen2.launch: torchrun alone exits 1 for any failure):
#   75 "retry later" (run this again), 2 "fix the input", 74 "storage failed", 1 a crash (docs/reliability.md).
set -euo pipefail

NNODES=${NNODES:?set NNODES}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-codegen2-$(basename "${RUN_DIR:?set RUN_DIR}")}
PARALLEL=${PARALLEL:-fsdp}
RESUME=$([ -f "$RUN_DIR/config.toml" ] && echo --resume || true)

exec python -m codegen2.launch \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id "$RDZV_ID" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    -m codegen2.cli train \
    --out "$RUN_DIR" \
    --parallel "$PARALLEL" \
    $RESUME \
    "$@"
