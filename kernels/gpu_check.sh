#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is lent: about 5 minutes on one GPU, one table at the end.
#
#   bash kernels/gpu_check.sh [OUT]        # OUT (default /tmp/gpu_check) receives the logs and JSON
#
# 1. the kernel tests with the compiled Triton backend on CUDA tensors (TRITON_INTERPRET=0);
# 2. python -m kernels.bench --device cuda at B = 256, P = 1e7, fp32 and bf16;
# 3. python -m dp.bench --device cuda --preset quick;
# 4. a smoke run of all three stages on CUDA (train.py --preset smoke --device cuda), then one sample grid.
# Every step runs even if an earlier one failed; the table says which passed and the figures each gave.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
declare -a ROWS

step() {  # name, command...: run, time, record pass/fail
  local name=$1; shift
  local t0; t0=$(date +%s)
  if "$@" > "$OUT/$name.log" 2>&1; then status=pass; else status="FAIL (rc $?)"; fi
  ROWS+=("$name|$status|$(( $(date +%s) - t0 )) s")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
step kernel-tests env TRITON_INTERPRET=0 $PY -m pytest -q tests/test_clip_noise.py tests/test_philox.py
step kernels-bench-fp32 $PY -m kernels.bench --device cuda --dtype fp32 --sizes 256x1e7 --json "$OUT/kernels_fp32.json"
step kernels-bench-bf16 $PY -m kernels.bench --device cuda --dtype bf16 --sizes 256x1e7 --json "$OUT/kernels_bf16.json"
step dp-bench-quick $PY -m dp.bench --device cuda --preset quick --json "$OUT/dp_bench_quick.json"
step smoke-stages $PY train.py --preset smoke --device cuda --out "$OUT/smoke" --noise-seed 0
step smoke-sample $PY sample.py --ckpt "$OUT/smoke/finetune.pt" --n 16 --out "$OUT/smoke_grid.png" --device cuda

echo
echo "GPU: $(cat "$OUT/gpu.txt")   date: $(date -u +%Y-%m-%d)"
printf '%-20s | %-12s | %s\n' step result time
for row in "${ROWS[@]}"; do IFS='|' read -r a b c <<< "$row"; printf '%-20s | %-12s | %s\n' "$a" "$b" "$c"; done
$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
for name in ("kernels_fp32", "kernels_bf16", "dp_bench_quick"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        print(f"{name}: {json.dumps(json.load(open(path)))[:600]}")
PYEOF
