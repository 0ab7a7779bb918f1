#!/usr/bin/env bash
# Settings search for the quick preset's DP fine-tuning, scored WITHOUT the real test set: every run holds out the
# last HOLDOUT images of MNIST train (--tune-holdout; N = 60000 - HOLDOUT), and each model is scored by the CNN of
# the downstream protocol trained on N_SYNTH synthetic images and tested on those held-out images
# (evaluate.py --real-split tune). They are tuning data outside the guarantee. Run from the repository root:
#   bash results/tune_quick.sh ../shared/data [NAME ...]      # default: every configuration below
#   PUBLIC_SET=synthsvhn bash results/tune_quick.sh ../shared/data [NAME ...]
# PUBLIC_SET (default synthdigits, the presets' public set when this search first ran) names the public stages:
# runs/quick's for synthdigits (train.py --preset quick --public synthdigits --stage pretrain), runs/synthsvhn's for
# synthsvhn and runs/synthsvhn_p6k's for synthsvhn_p6k, the same trained on to 6,000 pretraining steps
# (results/mnist_synthsvhn.sh makes both; PRETRAIN=9000 makes runs/synthsvhn_p9k, trained on to 9,000). NAME
# `public` scores the public stages alone, without fine-tuning.
# Finished steps are skipped. Each result lands in results/tune_quick/NAME.json (synthsvhn: results/tune_synthsvhn/,
# synthsvhn_p6k: results/tune_synthsvhn_p6k/, and so on); results/tune_quick.py tabulates them.
set -euo pipefail
DATA=${1:-../shared/data}; shift || true
HOLDOUT=${HOLDOUT:-5000}
N_SYNTH=${N_SYNTH:-10000}
PY=.venv/bin/python
PUBLIC_SET=${PUBLIC_SET:-synthdigits}
# PUBLIC_FLAGS: the flags that made the public stages, repeated so that the fine-tuning matches their configuration
case $PUBLIC_SET in
  synthdigits) PUBLIC=runs/quick; R=results/tune_quick; RUNS=runs/tune; PUBLIC_FLAGS="--public synthdigits" ;;
  synthsvhn) PUBLIC=runs/synthsvhn; R=results/tune_synthsvhn; RUNS=runs/tune_synthsvhn
             PUBLIC_FLAGS="--public synthsvhn" ;;
  # twice the pretraining steps (6,000) on synthsvhn: results/mnist_synthsvhn.sh's PRETRAIN=6000 makes the stages
  synthsvhn_p6k) PUBLIC=runs/synthsvhn_p6k; R=results/tune_synthsvhn_p6k; RUNS=runs/tune_synthsvhn_p6k
                 PUBLIC_FLAGS="--public synthsvhn --pretrain-steps 6000" ;;
  synthsvhn_p9k) PUBLIC=runs/synthsvhn_p9k; R=results/tune_synthsvhn_p9k; RUNS=runs/tune_synthsvhn_p9k  # 9,000 steps
                 PUBLIC_FLAGS="--public synthsvhn --pretrain-steps 9000" ;;
  *) echo "PUBLIC_SET=$PUBLIC_SET is not allowed; allowed: synthdigits synthsvhn synthsvhn_p6k synthsvhn_p9k" >&2
     exit 2 ;;
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
score() {  # name ckpt: sample N_SYNTH images from ckpt and score the CNN on the tuning split, once
  local name=$1 ckpt=$2 npz=$RUNS/$1/tune.npz
  mkdir -p $RUNS/$name
  [ -f $npz ] || $PY sample.py --ckpt $ckpt --n $N_SYNTH --sampler dpm++2m --steps 8 --out $npz
  [ -f $R/$name.json ] || $PY evaluate.py --synthetic $npz --real mnist --data-root "$DATA" \
      --real-split tune --tune-holdout $HOLDOUT --n-val $((N_SYNTH / 5)) --classifiers cnn --no-fd --out $R/$name.json
}
for name in "${ORDER[@]}"; do
  if [ "$name" = public ]; then  # the public stages alone, no fine-tuning: the public-only row on the tuning split
    echo "" > $R/public.flags
    score public $PUBLIC/pretrain.pt
    continue
  fi
  flags=${FLAGS[$name]:?unknown configuration $name}
  run=$RUNS/$name
  mkdir -p $run
  for f in autoencoder.pt pretrain.pt; do [ -f $run/$f ] || cp $PUBLIC/$f $run/; done
  echo "$flags" > $R/$name.flags
  if [ ! -f $run/finetune.pt ] || ! $PY -c "import json,sys; sys.exit(0 if json.load(open('$run/privacy_report.json'))['steps'] else 1)" 2>/dev/null; then
    t0=$(date +%s)
    resume=""; [ -f $run/finetune.pt ] && resume=--resume
    $PY train.py --preset quick $PUBLIC_FLAGS --stage finetune --data-root "$DATA" --out $run --noise-seed 0 \
        --tune-holdout $HOLDOUT $flags $resume
    echo $(( $(date +%s) - t0 )) > $R/$name.seconds
  fi
  score $name $run/finetune.pt
  cp $run/privacy_report.json $R/$name.privacy_report.json
done
