"""Pallas kernels of dsmoe, each with its pure-jnp reference and custom VJP.

  gmm/      grouped matmul gmm / tgmm of the routed experts (TPU Mosaic, GPU Triton)

Kernels take explicit arguments (never a config) and pick their
implementation by the platform they are lowered for; on CPU they run in the
Pallas interpreter (tests only).
"""
