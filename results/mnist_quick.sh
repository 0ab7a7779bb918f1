#!/usr/bin/env bash
# Reproduces results/mnist_quick.json: the quick preset (synthdigits public -> real MNIST private, delta 1e-5),
# downstream CNN/MLP/logreg accuracy on the real MNIST test set for several rows. Run from the repository root:
#   bash results/mnist_quick.sh ../shared/data
# Sample and evaluation sizes are reduced for a 2-core CPU (N_SYNTH images, 20 DDIM steps); see README.
set -euo pipefail
DATA=${1:-../shared/data}
N_SYNTH=${N_SYNTH:-5000}
PY=.venv/bin/python
OUT=runs/quick
mkdir -p results/mnist_quick
timed() { local name=$1; shift; local t0=$(date +%s); "$@"; echo $(( $(date +%s) - t0 )) > "results/mnist_quick/$name.seconds"; }

# public stages (autoencoder + pretraining on synthdigits), then the rows
[ -f $OUT/pretrain.pt ] || timed public $PY train.py --preset quick --stage pretrain --data-root "$DATA" --out $OUT
[ -f $OUT/finetune.pt ] || timed eps10 $PY train.py --preset quick --stage finetune --data-root "$DATA" --out $OUT --epsilon 10 --noise-seed 0
if [ ! -f runs/quick_eps1/finetune.pt ]; then
  mkdir -p runs/quick_eps1 && cp $OUT/autoencoder.pt $OUT/pretrain.pt runs/quick_eps1/
  timed eps1 $PY train.py --preset quick --stage finetune --data-root "$DATA" --out runs/quick_eps1 --epsilon 1 --noise-seed 0
fi
for row in public:$OUT/pretrain.pt eps10:$OUT/finetune.pt eps1:runs/quick_eps1/finetune.pt; do
  name=${row%%:*}; ckpt=${row#*:}
  $PY sample.py --ckpt "$ckpt" --n "$N_SYNTH" --steps 20 --out results/mnist_quick/$name.npz
  $PY sample.py --ckpt "$ckpt" --n 100 --steps 20 --out results/mnist_quick/$name.png
  $PY -m ldm.evaluate --synthetic results/mnist_quick/$name.npz --real mnist --data-root "$DATA" \
      --n-val $((N_SYNTH / 5)) --out results/mnist_quick/$name.eval.json
done

# collect every row into results/mnist_quick.json
$PY - "$OUT" <<'PYEOF'
import json, os, sys
out, rows = sys.argv[1], []
ft = "python train.py --preset quick --stage finetune --data-root DATA --noise-seed 0"
spec = [("public-only (no fine-tuning)", "public", None, "python train.py --preset quick --stage pretrain --data-root DATA"),
        ("DP fine-tuning, epsilon 10", "eps10", out, f"{ft} --out {out} --epsilon 10"),
        ("DP fine-tuning, epsilon 1", "eps1", "runs/quick_eps1", f"{ft} --out runs/quick_eps1 --epsilon 1")]
for label, name, run, command in spec:
    ev = f"results/mnist_quick/{name}.eval.json"
    if not os.path.exists(ev):
        continue
    e = json.load(open(ev))
    sec = f"results/mnist_quick/{name}.seconds"
    report = json.load(open(f"{run}/privacy_report.json")) if run else None
    rows.append(dict(row=label, command=command, checkpoint=f"{run or out}/{'finetune' if run else 'pretrain'}.pt",
                     finetune_seconds=int(open(sec).read()) if os.path.exists(sec) else None,
                     epsilon=report and report["epsilon"], delta=report and report["delta"],
                     sigma=report and report["sigma"], steps=report and report["steps"],
                     accuracy={k: v["test_accuracy"] for k, v in e["accuracy"].items()},
                     fd_digit_classifier=(e.get("fd_digit_classifier") or {}).get("value"),
                     n_synthetic=e["n_synthetic"], n_train=e["n_train"], n_val=e["n_val"], grid=f"results/mnist_quick/{name}.png"))
json.dump(dict(preset="quick", public="synthdigits", private="mnist", rows=rows), open("results/mnist_quick.json", "w"), indent=2)
print(json.dumps(rows, indent=2))
PYEOF
