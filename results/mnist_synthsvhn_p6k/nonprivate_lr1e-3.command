python train.py --preset laptop --public synthsvhn --pretrain-steps 6000 --data-root DATA --out runs/synthsvhn_p6k_nonprivate_lr1e-3 --stage finetune-nonprivate --lr 1e-3
