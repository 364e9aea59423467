"""Permute / unpermute of the MoE token rows (row gathers with gather-only VJPs).

  ops.py         permute / unpermute: custom VJPs, Triton on GPU, XLA elsewhere
  kernel_gpu.py  Triton kernels: gather_rows, combine_rows, row_dots
  reference.py   the same three in jnp (oracle, and the "xla" implementation)
"""

from pallas_kernels.permute import reference
from pallas_kernels.permute.ops import KERNELS, permute, unpermute

__all__ = ["KERNELS", "permute", "reference", "unpermute"]
