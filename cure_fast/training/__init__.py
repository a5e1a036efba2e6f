"""Certified training: the trainer (natural, PGD, IBP and SABR training for one or both norms, with
checkpoints, exact resume and DDP), its objectives (robust losses, CURE combinations, bound
alignment, warm-up regularizers, gradient projection) and the attacks (PGD, projections).

    cure_fast.training.trainer      Trainer, train, python -m cure_fast.training.trainer (torchrun)
    cure_fast.training.batch        one batch: the input sets to train on and the loss (Objective)
    cure_fast.training.rundir       a run folder's files, their order, the write-up, the signal guard
    cure_fast.training.objectives   the loss terms of certified training
    cure_fast.training.attacks      PGD over l∞ / l2 input sets, projection onto a set

The submodules are imported on their own; this package imports none of them.
"""
