"""Training: optimizer, train/eval steps, checkpoints, metrics, the loop."""

from dsmoe.train.loop import NonFiniteError, evaluate, train_and_evaluate
from dsmoe.train.step import eval_step, train_step

__all__ = ["NonFiniteError", "eval_step", "evaluate", "train_and_evaluate", "train_step"]
