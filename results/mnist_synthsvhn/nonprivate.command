python train.py --preset laptop --public synthsvhn --pretrain-steps 3000 --data-root DATA --out runs/synthsvhn_nonprivate --stage finetune-nonprivate --lr 5e-4
