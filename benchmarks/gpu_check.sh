#!/usr/bin/env bash
# The GPU check (issue 8): bf16 training step, activation capture and generation throughput, and the whole
# pipeline on CUDA, once on one device and once spread with device_map="auto" (part of it offloaded to CPU).
#
#   bash benchmarks/gpu_check.sh CONFIG_DIR OUT [BIG_CONFIG_JSON]
#
# CONFIG_DIR holds a model's config.json and tokenizer files (no weights): the model is built from it with
# random weights, so the check needs no download and carries no checkpoint. Random weights make speed and the
# code path real, not the safety figures: detection still finds neurons (harmful and benign prompts differ
# in their tokens, at a lower z-threshold), but refusal rates mean nothing here. BIG_CONFIG_JSON, if given, is a config for a larger
# model whose training step alone is benchmarked. Every step runs under a time limit and the script goes on
# after a failure; OUT gets the log and the results files.
set -uo pipefail
CONFIG_DIR=${1:?config folder}; OUT=${2:?output folder}; BIG=${3:-}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries the script itself on a machine without a GPU (with a tiny config)
SECTIONS=${SECTIONS:-train,capture,generate} REPEATS=${REPEATS:-1}
mkdir -p "$OUT"
MODELS=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step() {  # step NAME SECONDS CMD...: run with a time limit and print its exit status and wall time
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - start)) s"
}

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

# build.py CONFIG_JSON TOKENIZER_DIR DEST DEVICE: a random-weight bf16 checkpoint
cat > "$MODELS/build.py" <<'EOF'
import shutil, sys, time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

config_json, tokenizer_dir, dest, device = sys.argv[1:5]
config = AutoConfig.from_pretrained(config_json)
torch.manual_seed(0)
start = time.perf_counter()
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(dest)
for f in Path(tokenizer_dir).iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "generation_config", "special_tokens")):
        shutil.copy(f, dest)
n = sum(p.numel() for p in model.parameters())
print(f"built {dest}: {n:,} parameters, random bf16 weights, {time.perf_counter() - start:.1f} s")
EOF

step build 60 python3 "$MODELS/build.py" "$CONFIG_DIR/config.json" "$CONFIG_DIR" "$MODELS/model" "$DEVICE"
M="$MODELS/model"

# The pipeline on one GPU (bf16 by default there), then spread with device_map="auto" with the GPU capped so
# that part of the model sits on the CPU.
step run-one-device 100 python3 -m nestune run --model "$M" --preset smoke --device "$DEVICE" \
  --set detect.z_threshold=1.5 --out "$MODELS/run-one"
cp "$MODELS/run-one/results.json" "$OUT/run-one-device-results.json" 2>/dev/null
[ "$DEVICE" = cuda ] && step run-device-map 120 python3 -m nestune run --model "$M" --preset smoke \
  --set detect.z_threshold=1.5 --device-map auto --max-memory "0=300MiB,cpu=32GiB" --out "$MODELS/run-map"
cp "$MODELS/run-map/results.json" "$OUT/run-device-map-results.json" 2>/dev/null

# The benchmark suite, unchanged, on the GPU in bf16.
step bench 300 python3 benchmarks/run.py --model "$M" --device "$DEVICE" --dtype bf16 --repeats "$REPEATS" \
  --sections "$SECTIONS" --out "$MODELS/bench" --markdown "$MODELS/bench/B.md"
cp "$MODELS"/bench/*.json "$OUT/bench.json" 2>/dev/null

if [ -n "$BIG" ]; then
  step build-big 40 python3 "$MODELS/build.py" "$BIG" "$CONFIG_DIR" "$MODELS/big" "$DEVICE"
  step bench-big 80 python3 benchmarks/run.py --model "$MODELS/big" --device "$DEVICE" --dtype bf16 --repeats "$REPEATS" \
    --sections train --out "$MODELS/bench-big" --markdown "$MODELS/bench-big/B.md"
  cp "$MODELS"/bench-big/*.json "$OUT/bench-big.json" 2>/dev/null
fi
