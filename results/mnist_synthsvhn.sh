#!/usr/bin/env bash
# The final rows with synthsvhn as the public set: the street-style stand-in for SVHN (RGB crops, made grey the way
# SVHN is, with clutter; ldm/synthdigits.py), chosen for what SVHN is and never against MNIST. The quick preset's
# public stages on synthsvhn, then the laptop preset's DP settings (five DP epochs, MNIST train's last 5,000 images
# held out), each model scored once on the real MNIST test set at the protocol's sizes (60,000 images by
# DPM-Solver++(2M) with 8 steps; 50k train / 10k synthetic val; 28x28). Run from the repository root:
#   bash results/mnist_synthsvhn.sh ../shared/data [ROW ...]      # rows: public eps10 eps1 nonprivate (default all)
# Finished steps are skipped, so two copies with different rows can share the cores once the public stages exist.
# Every call ends by collecting the finished rows into results/mnist_synthsvhn.json.
set -euo pipefail
DATA=${1:-../shared/data}
ROWS=${*:2}
ROWS=${ROWS:-public eps10 eps1 nonprivate}
PY=.venv/bin/python
PUB=runs/synthsvhn  # the public stages and quick's own one-epoch fine-tuning: the new user's command, timed
R=results/mnist_synthsvhn
mkdir -p $R
timed() { local name=$1; shift; local t0=$(date +%s); "$@"; echo $(( $(date +%s) - t0 )) > "$R/$name.seconds"; }
[ -f $PUB/finetune.pt ] || timed quick_all $PY train.py --preset quick --public synthsvhn --data-root "$DATA" \
    --out $PUB --noise-seed 0

row() {  # name: fine-tune (laptop settings) unless public, then sample 60,000 and evaluate once
  local name=$1 out=runs/synthsvhn_$1 ckpt flags
  [ -f $R/$name.eval.json ] && return
  case $name in
    public) ckpt=$PUB/pretrain.pt ;;
    eps10|eps1) ckpt=$out/finetune.pt; flags="--stage finetune --epsilon ${name#eps} --noise-seed 0" ;;
    nonprivate) ckpt=$out/finetune-nonprivate.pt; flags="--stage finetune-nonprivate" ;;
    *) echo "unknown row $name; rows: public eps10 eps1 nonprivate" >&2; exit 2 ;;
  esac
  if [ "$name" != public ] && [ ! -f "$ckpt" ]; then
    mkdir -p $out && cp -n $PUB/autoencoder.pt $PUB/pretrain.pt $out/
    echo "python train.py --preset laptop --public synthsvhn --data-root DATA --out $out $flags" > $R/$name.command
    timed $name.finetune $PY train.py --preset laptop --public synthsvhn --data-root "$DATA" --out $out $flags
  fi
  [ -f $R/$name.png ] || $PY sample.py --ckpt $ckpt --n 100 --out $R/$name.png
  [ -f runs/synthsvhn_$name.npz ] || timed $name.sample $PY sample.py --ckpt $ckpt --n 60000 --batch-size 500 \
      --out runs/synthsvhn_$name.npz
  timed $name.eval $PY evaluate.py --synthetic runs/synthsvhn_$name.npz --real mnist --data-root "$DATA" \
      --out $R/$name.eval.json
}
for name in $ROWS; do row $name; done

$PY - <<'PYEOF'
import json, os
R, rows = "results/mnist_synthsvhn", []
read = lambda path, f=lambda s: int(s): f(open(path).read().strip()) if os.path.exists(path) else None
for name in ("public", "eps10", "eps1", "nonprivate"):
    if not os.path.exists(f"{R}/{name}.eval.json"):
        continue
    e = json.load(open(f"{R}/{name}.eval.json"))
    report = read(f"runs/synthsvhn_{name}/privacy_report.json", json.loads) or {}
    rows.append(dict(row=name, differentially_private=bool(report),
                     command=read(f"{R}/{name}.command", str) or "python train.py --preset quick --public synthsvhn "
                     "--data-root DATA --out runs/synthsvhn --noise-seed 0  # its pretrain.pt",
                     **{k: report.get(k) for k in ("epsilon", "epsilon_rdp_crosscheck", "delta", "sigma", "steps",
                                                   "n_private")},
                     finetune_seconds=read(f"{R}/{name}.finetune.seconds"),
                     sample_seconds=read(f"{R}/{name}.sample.seconds"), eval_seconds=read(f"{R}/{name}.eval.seconds"),
                     accuracy={k: v["test_accuracy"] for k, v in e["accuracy"].items()},
                     fd_digit_classifier=(e.get("fd_digit_classifier") or {}).get("value"),
                     n_synthetic=e["n_synthetic"], n_train=e["n_train"], n_val=e["n_val"], grid=f"{R}/{name}.png"))
json.dump(dict(public="synthsvhn", private="mnist", public_stages="quick preset", dp_settings="laptop preset",
               quick_all_seconds=read(f"{R}/quick_all.seconds"), rows=rows),
          open("results/mnist_synthsvhn.json", "w"), indent=2)
print(json.dumps(rows, indent=2))
PYEOF
