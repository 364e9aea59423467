"""Learning-rate schedules and the AdamW optimizer (DeepSeekMoE section 4.1).

Schedules take the number of updates already made, `s` (0 for the first
update), and return the learning rate of update `s`:

* warmup (all schedules): ``peak * (s + 1) / warmup_steps`` while
  ``s < warmup_steps`` (so the first update already learns and update
  ``warmup_steps - 1`` uses the peak);
* ``paper_step``: then ``peak``, ``peak * 0.316`` from ``s >= floor(0.8 *
  steps)`` and ``peak * 0.316**2`` from ``s >= floor(0.9 * steps)``;
* ``cosine``: then ``peak * (0.1 + 0.9 * (1 + cos(pi * p)) / 2)`` with
  ``p = (s - warmup) / (steps - warmup)`` clipped to [0, 1] (ends at 10%);
* ``constant``: then ``peak`` (the paper's 145B run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsmoe.errors import ConfigError

STEP_DECAY = 0.316  # paper: x0.316 at 80% and again at 90% of the steps
COSINE_FLOOR = 0.1  # cosine ends at 10% of the peak


def _warmup(peak: float, warmup_steps: int):
  def fn(s):
    return peak * jnp.minimum(1.0, (s + 1.0) / max(warmup_steps, 1))
  return fn


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """The `train.schedule` learning rate as a function of the update count."""
  peak, warmup, steps = train.learning_rate, train.warmup_steps, train.steps
  warm = _warmup(peak, warmup)
  if train.schedule == "paper_step":
    b1, b2 = int(0.8 * steps), int(0.9 * steps)

    def after(s):
      return peak * jnp.where(s >= b2, STEP_DECAY**2, jnp.where(s >= b1, STEP_DECAY, 1.0))
  elif train.schedule == "cosine":
    def after(s):
      p = jnp.clip((s - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      return peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + jnp.cos(jnp.pi * p)))
  elif train.schedule == "constant":
    def after(s):
      return peak * jnp.ones_like(s, jnp.float32)
  else:
    raise ConfigError(f"config.train.schedule={train.schedule!r} is invalid: "
                     "must be one of ['paper_step', 'cosine', 'constant']")

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    return jnp.where(s < warmup, warm(s), after(s)).astype(jnp.float32)
  return schedule


def _decay_mask(params):
  """Weight decay on matrices (and embedding tables), not on norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the configured schedule."""
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(make_schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask),
  )
