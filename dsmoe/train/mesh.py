"""The training mesh and global batches (the code lives in dsmoe.parallel.mesh).

`config.mesh.{data, fsdp, expert}` (one may be -1: the devices left) build a
(data, fsdp, expert) mesh over every device of every process; batches are
split over all three axes; the state follows dsmoe.parallel.rules.
"""

from dsmoe.parallel.mesh import batch_sharding, check_model_fits, global_batch, make_mesh

__all__ = ["batch_sharding", "check_model_fits", "global_batch", "make_mesh"]
