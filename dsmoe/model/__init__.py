"""Flax NNX modules of the DeepSeekMoE transformer."""

from dsmoe.model.moe import MoE
from dsmoe.model.transformer import Block, Transformer

__all__ = ["Block", "MoE", "Transformer"]
