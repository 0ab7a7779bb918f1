python train.py --preset laptop --public synthsvhn --data-root DATA --out runs/synthsvhn_nonprivate --stage finetune-nonprivate --lr 5e-4
