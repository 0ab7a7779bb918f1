#!/usr/bin/env bash
# Settings search for the quick preset's DP fine-tuning, scored WITHOUT the real test set: every run holds out the
# last HOLDOUT images of MNIST train (--tune-holdout; N = 60000 - HOLDOUT), and each model is scored by the CNN of
# the downstream protocol trained on N_SYNTH synthetic images and tested on those held-out images
# (evaluate.py --real-split tune). They are tuning data outside the guarantee. Run from the repository root:
#   bash results/tune_quick.sh ../shared/data [NAME ...]      # default: every configuration below
#   PUBLIC_SET=synthsvhn bash results/tune_quick.sh ../shared/data [NAME ...]
# PUBLIC_SET (default synthdigits, the presets' public set when this search first ran) names the public set; the
# public stages are runs/quick's for synthdigits (train.py --preset quick --public synthdigits --stage pretrain)
# and runs/synthsvhn's for synthsvhn (results/mnist_synthsvhn.sh makes them). Finished steps are skipped.
# Each result lands in results/tune_quick/NAME.json (synthsvhn: results/tune_synthsvhn/); results/tune_quick.py
# tabulates them.
set -euo pipefail
DATA=${1:-../shared/data}; shift || true
HOLDOUT=${HOLDOUT:-5000}
N_SYNTH=${N_SYNTH:-10000}
PY=.venv/bin/python
PUBLIC_SET=${PUBLIC_SET:-synthdigits}
case $PUBLIC_SET in
  synthdigits) PUBLIC=runs/quick; R=results/tune_quick; RUNS=runs/tune ;;
  synthsvhn) PUBLIC=runs/synthsvhn; R=results/tune_synthsvhn; RUNS=runs/tune_synthsvhn ;;
  *) echo "PUBLIC_SET=$PUBLIC_SET is not allowed; allowed: synthdigits synthsvhn" >&2; exit 2 ;;
esac
declare -A FLAGS=(
  [eps10_e1]="--epsilon 10 --epochs 1"
  [eps10_e5]="--epsilon 10 --epochs 5"
  [eps10_e5_lr1e-3]="--epsilon 10 --epochs 5 --lr 1e-3"
  [eps10_e5_b1024_lr1e-3]="--epsilon 10 --epochs 5 --expected-batch 1024 --lr 1e-3"
  [eps10_e5_lora8_lr2e-3]="--epsilon 10 --epochs 5 --dp-lora 8 --lr 2e-3"
  # the clipping bound C (quick: 1e-2; the original work: 1e-3) and the trainable set, at the best lr above
  [eps10_e5_lr1e-3_C1e-3]="--epsilon 10 --epochs 5 --lr 1e-3 --clip 1e-3"
  [eps10_e5_lr1e-3_C1e-1]="--epsilon 10 --epochs 5 --lr 1e-3 --clip 1e-1"
  [eps10_e5_lr1e-3_levels2]="--epsilon 10 --epochs 5 --lr 1e-3 --dp-blocks levels=2"
  [eps10_e5_lr1e-3_decoder]="--epsilon 10 --epochs 5 --lr 1e-3 --dp-blocks decoder"
  # epsilon 1 with the settings chosen at epsilon 10 (not tuned on their own)
  [eps1_e5]="--epsilon 1 --epochs 5"
  [eps1_e5_lr1e-3]="--epsilon 1 --epochs 5 --lr 1e-3"
  # more epochs at the same epsilon (synthsvhn, 2026-12-03): 1 -> 5 gained most of all on synthdigits
  [eps10_e10_lr1e-3_C1e-1]="--epsilon 10 --epochs 10 --lr 1e-3 --clip 1e-1"
)
ORDER=(eps10_e1 eps10_e5 eps10_e5_lr1e-3 eps10_e5_b1024_lr1e-3 eps10_e5_lora8_lr2e-3 eps10_e5_lr1e-3_C1e-3
       eps10_e5_lr1e-3_C1e-1 eps10_e5_lr1e-3_levels2 eps10_e5_lr1e-3_decoder eps1_e5 eps1_e5_lr1e-3 eps10_e10_lr1e-3_C1e-1)
[ $# -gt 0 ] && ORDER=("$@")
mkdir -p $R
for name in "${ORDER[@]}"; do
  flags=${FLAGS[$name]:?unknown configuration $name}
  run=$RUNS/$name
  mkdir -p $run
  for f in autoencoder.pt pretrain.pt; do [ -f $run/$f ] || cp $PUBLIC/$f $run/; done
  echo "$flags" > $R/$name.flags
  if [ ! -f $run/finetune.pt ] || ! $PY -c "import json,sys; sys.exit(0 if json.load(open('$run/privacy_report.json'))['steps'] else 1)" 2>/dev/null; then
    t0=$(date +%s)
    resume=""; [ -f $run/finetune.pt ] && resume=--resume
    $PY train.py --preset quick --public $PUBLIC_SET --stage finetune --data-root "$DATA" --out $run --noise-seed 0 \
        --tune-holdout $HOLDOUT $flags $resume
    echo $(( $(date +%s) - t0 )) > $R/$name.seconds
  fi
  [ -f $run/tune.npz ] || $PY sample.py --ckpt $run/finetune.pt --n $N_SYNTH --sampler dpm++2m --steps 8 --out $run/tune.npz
  [ -f $R/$name.json ] || $PY evaluate.py --synthetic $run/tune.npz --real mnist --data-root "$DATA" \
      --real-split tune --tune-holdout $HOLDOUT --n-val $((N_SYNTH / 5)) --classifiers cnn --no-fd --out $R/$name.json
  cp $run/privacy_report.json $R/$name.privacy_report.json
done
