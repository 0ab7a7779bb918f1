#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is lent: about 5 minutes on one GPU, one table at the end.
#
#   bash kernels/gpu_check.sh --fetch-wheels   # beforehand, where the package registries are reachable: the
#                                              # pure-Python packages a bare GPU image may lack, into $WHEELS
#   bash kernels/gpu_check.sh [OUT]            # on the GPU machine: the check; OUT (default /tmp/gpu_check)
#
# 1. the kernel tests with the compiled Triton backend on CUDA tensors (TRITON_INTERPRET=0);
# 2. python -m kernels.bench --device cuda at B = 256, P = 1e7, fp32 and bf16;
# 3. python -m dp.bench --device cuda --preset quick (with Opacus's two columns when opacus is importable);
# 4. a smoke run of all three stages on CUDA (train.py --preset smoke --device cuda), then one sample grid.
# Every step runs even if an earlier one failed; the table says which passed and the figures each gave.
#
# Python: $PY, else .venv/bin/python where it exists, else python3 (a lent machine's image holds torch there; the
# .venv of a CPU checkout does not travel). Wheels found in $WHEELS (default .whl) are installed first into a
# temporary folder put on PYTHONPATH, without the network. OUT receives at most 6 plain files, no folders
# (a lent machine sends back 8): summary.txt (the table), the three benchmarks' JSON, the smoke run's sample grid,
# and logs.tar.gz (every step's log and the smoke run's folder without its checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
FETCH=(prv-accountant==0.2.0 opacus==1.6.0)  # requirements.txt's pin; the version dp.bench was measured with
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ "${1:-}" = "--fetch-wheels" ]; then
  exec "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${FETCH[@]}"
fi

OUT=${1:-/tmp/gpu_check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
declare -a ROWS

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
    > "$WORK/wheels.log" 2>&1 && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # name, command...: run, time, record pass/fail
  local name=$1; shift
  local t0; t0=$(date +%s)
  if "$@" > "$WORK/$name.log" 2>&1; then status=pass; else status="FAIL (rc $?)"; fi
  ROWS+=("$name|$status|$(( $(date +%s) - t0 )) s")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.txt" 2>&1 || true
step kernel-tests env TRITON_INTERPRET=0 "$PY" -m pytest -q tests/test_clip_noise.py tests/test_philox.py
step kernels-bench-fp32 "$PY" -m kernels.bench --device cuda --dtype fp32 --sizes 256x1e7 --json "$OUT/kernels_fp32.json"
step kernels-bench-bf16 "$PY" -m kernels.bench --device cuda --dtype bf16 --sizes 256x1e7 --json "$OUT/kernels_bf16.json"
step dp-bench-quick "$PY" -m dp.bench --device cuda --preset quick --json "$OUT/dp_bench_quick.json"
step smoke-stages "$PY" train.py --preset smoke --device cuda --out "$WORK/smoke" --noise-seed 0
step smoke-sample "$PY" sample.py --ckpt "$WORK/smoke/finetune.pt" --n 16 --out "$OUT/smoke_grid.png" --device cuda

{
  echo "GPU: $(cat "$WORK/gpu.txt")   date: $(date -u +%Y-%m-%d)   python: $PY   wheels: $(ls "$WORK/site" 2>/dev/null |
       grep -c dist-info) installed from $WHEELS"
  printf '%-20s | %-12s | %s\n' step result time
  for row in "${ROWS[@]}"; do IFS='|' read -r a b c <<< "$row"; printf '%-20s | %-12s | %s\n' "$a" "$b" "$c"; done
  "$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
for name in ("kernels_fp32", "kernels_bf16", "dp_bench_quick"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        print(f"{name}: {json.dumps(json.load(open(path)))[:600]}")
PYEOF
} > "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.pt' --exclude=site .
echo
cat "$OUT/summary.txt"
printf '%s\n' "${ROWS[@]}" | grep -q FAIL && echo "failing steps' logs: tar -xzf $OUT/logs.tar.gz"
rm -rf "$WORK"
