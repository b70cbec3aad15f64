#!/usr/bin/env bash
# GPU readiness check: a training step (FSDP2 via torchrun, bf16, torch.compile, activation checkpointing) for
# every architecture (1B-shaped CodeGen and LLaMA, Qwen2.5-Coder-0.5B, a StarCoder2-3B-layered model), a LoRA step
# at codegen25-7b's shape (peak memory against 20 GiB), and greedy decoding against transformers.
#
#   scripts/gpu_check.sh               on a CUDA machine with its own PyTorch (>= 2.11) and transformers; no install
#   scripts/gpu_check.sh --cpu-smoke   the same code path with tiny shapes on the CPU (checks the script itself)
#
# Each section runs in its own process under a timeout, so one failure or hang does not lose the others.
# Results: one JSON line per result in $OUT/gpu_check.jsonl (or runs/gpu_check/ when OUT is unset), plus
# each section's log next to it. The whole script stays under 8 minutes (the timeouts below add up to 478 s).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
DEST=${OUT:-runs/gpu_check}
mkdir -p "$DEST"
RESULTS="$DEST/gpu_check.jsonl"
SMOKE=()
TRAIN_S=72   # x 4 architectures
LORA_S=60
DECODE_S=52  # x 2
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE=(--cpu-smoke)
fi
: > "$RESULTS"

section() {  # section NAME SECONDS COMMAND...: run under a timeout, log to $DEST/NAME.log, note a failure
  local name=$1 seconds=$2
  shift 2
  local began=$SECONDS
  echo "== $name (limit ${seconds}s)"
  timeout --kill-after=10 "$seconds" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$DEST/$name.log"
  if [[ $rc -ne 0 ]]; then
    local why="exit status $rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${seconds}s"
    echo "{\"section\": \"$name\", \"failed\": \"$why\", \"log\": \"$DEST/$name.log\"}" | tee -a "$RESULTS"
  fi
  echo "   ($((SECONDS - began)) s)"
}

section environment 20 "$PYTHON" -c '
import json, sys, torch
info = {"section": "environment", "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
try:
    import transformers
    info["transformers"] = transformers.__version__
except ImportError:
    info["transformers"] = None
print(json.dumps(info))
open(sys.argv[1], "a").write(json.dumps(info) + "\n")
' "$RESULTS"

for arch in codegen llama qwen2 starcoder2; do
  section "train-$arch" "$TRAIN_S" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 \
    scripts/gpu_check.py train --arch "$arch" --results "$RESULTS" "${SMOKE[@]}"
done
section lora-codegen25-7b "$LORA_S" "$PYTHON" scripts/gpu_check.py lora --results "$RESULTS" "${SMOKE[@]}"
for arch in codegen llama; do
  section "decode-$arch" "$DECODE_S" "$PYTHON" scripts/gpu_check.py decode --arch "$arch" --results "$RESULTS" \
    "${SMOKE[@]}"
done
echo "results: $RESULTS"
