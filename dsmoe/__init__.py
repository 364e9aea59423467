"""dsmoe: DeepSeekMoE in JAX / Flax NNX."""

from dsmoe.accounting import count_params, flops_per_token
from dsmoe.config import base_config, resolve, validate

__all__ = ["base_config", "count_params", "flops_per_token", "resolve", "validate"]
