"""Grouped matmul (gmm) and its transpose (tgmm) for MoE experts, TPU and GPU.

  ops.py         gmm / tgmm: kernel by lowering platform, custom VJP
  kernel_tpu.py  Mosaic kernels (scalar-prefetched visit list)
  kernel_gpu.py  Triton kernels
  metadata.py    group metadata (jnp) the kernels read
  tiling.py      Tiling and the per-platform defaults
  reference.py   the pure-jnp meaning of both (test oracle)
"""

from pallas_kernels.gmm import reference
from pallas_kernels.gmm.ops import KERNELS, gmm, tgmm
from pallas_kernels.gmm.tiling import Tiling

__all__ = ["KERNELS", "Tiling", "gmm", "reference", "tgmm"]
