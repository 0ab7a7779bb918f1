python train.py --preset laptop --public synthsvhn --pretrain-steps 6000 --data-root DATA --out runs/synthsvhn_p6k_eps10 --stage finetune --epsilon 10 --noise-seed 0 --lr 5e-4 --clip 1e-2
