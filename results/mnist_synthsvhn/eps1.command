python train.py --preset laptop --public synthsvhn --pretrain-steps 3000 --data-root DATA --out runs/synthsvhn_eps1 --stage finetune --epsilon 1 --noise-seed 0 --lr 5e-4 --clip 1e-2
