#!/usr/bin/env bash
# Which sampler gives the better downstream classifier, scored on the tuning split (never the test set): the same
# fine-tuned model (results/tune_quick.sh's eps10_e5), N_SYNTH images per sampler, the CNN of the protocol tested on
# the last HOLDOUT MNIST training images. Run from the repository root:  bash results/tune_sampler.sh ../shared/data
set -euo pipefail
DATA=${1:-../shared/data}
HOLDOUT=${HOLDOUT:-5000}
N_SYNTH=${N_SYNTH:-10000}
PY=.venv/bin/python
RUN=${RUN:-runs/tune/eps10_e5}
R=results/tune_quick
# DPM-Solver++(2M) with 8 steps is results/tune_quick.sh's own sampler: its score is results/tune_quick/eps10_e5.json
for spec in "ddim 50" "ddim 20"; do
  set -- $spec
  name=sampler_$1_$2
  [ -f $R/$name.json ] && continue
  npz=$RUN/tune_$1_$2.npz
  t0=$(date +%s)
  [ -f $npz ] || $PY sample.py --ckpt $RUN/finetune.pt --n $N_SYNTH --sampler $1 --steps $2 --out $npz
  echo $(( $(date +%s) - t0 )) > $R/$name.sample.seconds
  $PY evaluate.py --synthetic $npz --real mnist --data-root "$DATA" --real-split tune --tune-holdout $HOLDOUT \
      --n-val $((N_SYNTH / 5)) --classifiers cnn --no-fd --out $R/$name.json
done
