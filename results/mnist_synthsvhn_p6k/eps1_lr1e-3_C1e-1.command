python train.py --preset laptop --public synthsvhn --pretrain-steps 6000 --data-root DATA --out runs/synthsvhn_p6k_eps1_lr1e-3_C1e-1 --stage finetune --epsilon 1 --noise-seed 0 --lr 1e-3 --clip 1e-1
