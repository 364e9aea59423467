"""Training: optimizer, train/eval steps, checkpoints, metrics, the loop."""

from dsmoe.train.evaluation import evaluate, evaluate_checkpoint
from dsmoe.train.loop import NonFiniteError, train_and_evaluate
from dsmoe.train.step import train_step

__all__ = ["NonFiniteError", "evaluate", "evaluate_checkpoint",
           "train_and_evaluate", "train_step"]
