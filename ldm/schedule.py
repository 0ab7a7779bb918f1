"""The learning-rate schedule every stage uses."""


def lr_at(step, base_lr, warmup):
    """Linear warm-up over `warmup` steps (counted in optimiser steps), then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr
