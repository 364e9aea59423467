"""Config schema, the paper's fine-grained form, and validation.

Every config file in `configs/` starts from :func:`base_config` and changes a
few fields, so all configs share one schema and `lock_config=True` refuses
unknown keys given on the command line.

MoE sizes can be given in two ways:

* explicitly: ``model.moe.num_routed_experts``, ``num_shared_experts``,
  ``top_k`` (routed experts per token) and ``expert_hidden``;
* in the paper's form (DeepSeekMoE section 3): ``model.moe.fine_grained``
  with N coarse experts, segmentation factor m, K coarse experts per token,
  K_s shared experts and the standard FFN hidden size. :func:`resolve`
  derives ``mN - K_s`` routed experts, top-``(mK - K_s)`` and expert hidden
  ``ffn_hidden / m``; an explicit size that is also set wins over the derived
  one, so ``--config.model.moe.num_routed_experts=32`` works on any config.

:func:`validate` checks every rule before anything is traced and raises one
:class:`dsmoe.errors.ConfigError` naming the key and the rule.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from dsmoe.errors import ConfigError
from dsmoe.spec import (DROP_POLICIES, EP_EXCHANGES, GMM_BACKENDS, GMM_STRATEGIES, IMPLS,
                        MESH_AXES, REMAT_POLICIES, ExpertPlan, MoESpec, ModelSpec, Spec)

SCORE_FNS = ("softmax", "sigmoid")
ROUTERS = ("topk", "hash")
DTYPES = ("float32", "bfloat16")
EXPLICIT_SIZES = ("num_routed_experts", "num_shared_experts", "top_k", "expert_hidden")
SCHEDULES = ("paper_step", "cosine", "constant")
SHIPPED_CONFIGS = "dsmoe.configs"  # the repository's configs/ folder, installed under dsmoe


def base_config() -> ml_collections.ConfigDict:
  """The full schema with small, CPU-friendly defaults."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 512
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.head_dim = 0  # 0: d_model // num_heads
  m.dense_hidden = 512  # hidden size of the dense (non-MoE) FFN layers
  m.first_k_dense_replace = 1  # the first k layers use a dense FFN
  m.moe_layer_freq = 1  # after those, every moe_layer_freq-th layer is MoE
  m.rope_theta = 10000.0
  m.rms_norm_eps = 1e-6
  m.init_std = 0.006  # paper: 0.006 for every size
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"
  m.param_dtype = "float32"  # parameter (master weight) dtype
  m.remat = "none"  # activation rematerialisation per block: "none", "full",
  # "save_dots" (keep matmul outputs), "save_moe_exchange" (keep only what
  # crossed the expert-parallel exchange); docs/SCALING.md
  m.scan_layers = False  # run the MoE layers as one nnx.scan over stacked
  # weights (fast compiles of 28-62 layers; params gain a layer axis)

  m.moe = e = ml_collections.ConfigDict()
  e.router = "topk"  # "topk" (learned) or "hash" (Hash Layer baseline)
  e.num_routed_experts = config_dict.placeholder(int)  # N' (None: derive)
  e.num_shared_experts = config_dict.placeholder(int)  # K_s
  e.top_k = config_dict.placeholder(int)  # K' routed experts per token
  e.expert_hidden = config_dict.placeholder(int)  # hidden size of one expert
  e.fine_grained = ml_collections.ConfigDict(
      dict(N=0, m=1, K=0, K_s=0, ffn_hidden=0))  # paper form; N=0: unused
  e.score_fn = "softmax"  # v1/v2: softmax; v3: sigmoid
  e.norm_topk_prob = False  # v1: False (weights not renormalised)
  e.routed_scaling_factor = 1.0
  e.aux_loss_alpha = 0.01  # a1, expert-level balance
  e.seq_aux = True  # expert balance computed per sequence (released 16B)
  # Device-level settings act on D = mesh.expert groups of consecutive routed
  # experts (the devices of expert parallelism); they need mesh.expert >= 2.
  e.device_balance_alpha = 0.0  # a2, device-level balance
  e.max_devices_per_token = 0  # M of V2 device-limited routing; 0: no limit
  e.comm_balance_alpha = 0.0  # a3, V2 communication balance (needs M > 0)
  # The routed experts' implementation (docs/MODEL.md, "Routed-expert
  # implementations", has the table; a setting that cannot apply is refused):
  e.impl = "dropless"  # "dense" (reference), "dropless", "capacity"
  e.gmm_backend = "auto"  # grouped matmul: "auto" (by platform), "blocked",
  # "ragged_dot", "pallas" (Pallas kernels: TPU/GPU; on CPU interpreted, tests only)
  e.gmm_strategy = "auto"  # how "blocked" runs: "auto" (CPU: "loop", else
  # "batched"), "loop", "batched", "kernel" (opt-in C++ CPU kernel, float32)
  e.block_size = 0  # rows per single-expert block ("blocked", "pallas"); 0: from the shape
  e.capacity_factor = 1.25  # training: capacity = factor * tokens * top_k / groups,
  # per expert (impl="capacity") or per destination device (ep_exchange="all_to_all")
  e.eval_capacity_factor = 0.0  # the same at evaluation; 0: never drop
  e.drop_policy = "position"  # who is dropped first: "position" or "score"
  e.ep_exchange = "auto"  # token exchange when mesh.expert > 1: "allgather",
  # "all_to_all" (per-device capacity), "ragged_all_to_all" (TPU/GPU);
  # "auto": ragged_all_to_all on TPU/GPU, allgather on CPU

  c.data = d = ml_collections.ConfigDict()  # see docs/DATA.md
  d.seq_len = 128  # tokens per packed row
  d.tfds_name = ""  # a prepared TFDS dataset ("lm1b", "c4/en"); "": local_text
  d.text_key = "text"  # feature holding the text in data.tfds_name
  d.text_dir = ""  # local_text folder; "": the Python stdlib source (*.py)
  d.file_glob = ""  # local_text patterns, "*.txt,*.md"; "": defaults (DATA.md)
  d.validation_percent = 5.0  # local_text: % of files (by path hash) held out
  d.data_dir = "data_cache/tfds"  # TFDS data and tokenizer cache
  d.tokenizer = "sentencepiece"  # "sentencepiece" (BPE), "bytes" (256), "hf" (tokenizer.json)
  # The next four are read only where a SentencePiece BPE is trained
  # (tokenizer="sentencepiece", no tokenizer_path): "bytes" has 256 ids with
  # pad/bos/eos 0/254/255, and an existing .model or tokenizer.json brings
  # its own vocabulary and special ids.
  d.vocab_size = 8192  # BPE pieces to train (paper 2B: 8K); <= model.vocab_size
  d.tokenizer_sample_bytes = 4_000_000  # training-split text to train the BPE on
  d.pad_id, d.bos_id, d.eos_id = 0, 1, 2  # the trained BPE's special ids
  d.tokenizer_path = ""  # an existing SentencePiece .model ("": train + cache) or, for "hf", a tokenizer.json
  d.add_bos = False  # documents: [BOS] tokens EOS
  d.num_threads = 2  # grain threads reading + tokenizing documents
  d.prefetch_docs = 64  # documents read ahead
  d.prefetch_batches = 0  # batches prepared ahead in a thread (0: none)
  d.eval_tokens = 65_536  # scored tokens of the fixed evaluation set (validation split)
  d.eval_doc_tokens = 8192  # at most this many of them from one document

  c.train = t = ml_collections.ConfigDict()
  t.steps = 300
  t.batch_size = 16
  t.seed = 0
  t.log_every = 10
  t.checkpoint_every = 100
  t.learning_rate = 1e-3  # peak
  t.schedule = "paper_step"  # "paper_step", "cosine", "constant"
  t.warmup_steps = 30
  t.b1 = 0.9
  t.b2 = 0.95
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.grad_accum_steps = 1  # micro-batches per update (batch_size is the total)
  t.keep_checkpoints = 3  # keep the last K checkpoints in workdir
  t.skip_nonfinite = False  # True: skip non-finite updates (counted); False: stop
  t.max_skipped_fraction = 0.1  # with skip_nonfinite: fail past this share of train.steps
  t.peak_flops = 0.0  # peak FLOP/s per device for MFU; 0: measure a matmul
  t.eval_every = 0  # evaluate every N steps (0: only at the end)
  t.eval_batches = 4  # batches of the fixed evaluation set scored during training
  t.eval_full_at_end = False  # True: the final evaluation scores the whole set
  t.init_from = ""  # a params-only checkpoint (scripts/convert_hf.py) to start from; "": random

  c.mesh = mesh = ml_collections.ConfigDict()  # device mesh (docs/SCALING.md)
  mesh.data = -1  # pure data parallel (replicated weights); -1: what is left
  mesh.fsdp = 1  # data parallel with weights + optimizer state sharded (FSDP)
  mesh.expert = 1  # expert parallel: routed experts split over these devices
  return c


def fine_grained(N: int, m: int, K: int, K_s: int, ffn_hidden: int) -> dict:
  """The paper's (N, m, K, K_s) form -> routed experts, top-k, expert hidden."""
  return dict(num_routed_experts=m * N - K_s, num_shared_experts=K_s,
              top_k=m * K - K_s, expert_hidden=ffn_hidden // m)


def resolve(config, *, platform: str | None = None) -> Spec:
  """Validates `config` and returns its frozen, hashable :class:`Spec`.

  MoE sizes given in the paper's form are filled in, ``head_dim=0`` becomes
  ``d_model // num_heads``, and the routed experts' :class:`ExpertPlan` is
  resolved for `platform` ("cpu", "tpu", "gpu"; default: the platform JAX
  runs on here), the one the step will be lowered for. A `Spec` passes
  through unchanged.
  """
  if isinstance(config, Spec):
    return config
  validate(config, platform=platform)
  m = config.model
  moe = dict(m.moe.to_dict(), **moe_sizes(m.moe))
  for key in ("fine_grained", *PLAN_KEYS):
    del moe[key]
  moe.update(num_device_groups=max(1, config.mesh.expert),
             plan=expert_plan(config, platform))
  model = dict(m.to_dict(), moe=MoESpec(**moe),
               head_dim=m.head_dim or m.d_model // m.num_heads)
  return Spec(model=ModelSpec(**model), data=_frozen(config.data),
              train=_frozen(config.train), mesh=_frozen(config.mesh), config=_frozen(config))


def _frozen(c: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(c)


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict of a config file: ``get_config(arg)``.

  `name` is a path (``"configs/ablation.py"``) or the name of a config shipped
  with the package (``"tiny"``, ``"ablation"``); ``"name:arg"`` also gives the
  argument, as on the command line (``load("ablation:gshard")``). Shipped
  names resolve from the installed ``dsmoe.configs`` package (the
  repository's ``configs/`` folder), never from the current folder.
  """
  if arg is None and ":" in name and not os.path.exists(name):
    name, arg = name.rsplit(":", 1)
  path = config_file(name)
  mod_spec = importlib.util.spec_from_file_location(
      f"dsmoe_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg)


def config_file(name: str) -> str:
  """The path of config `name`: a path as given, or a shipped config's file."""
  path = name if name.endswith(".py") or os.sep in name else None
  if path is None:
    path = os.path.join(_shipped_folder(), f"{name}.py")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config named {name!r}; shipped configs: "
                              f"{', '.join(shipped_configs())}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  return path


def _shipped_folder() -> str:
  """The folder of the ``dsmoe.configs`` package (found, not imported: the
  config files are read by path); in a source checkout that was not
  installed, the ``configs/`` folder next to the dsmoe package."""
  spec = importlib.util.find_spec(SHIPPED_CONFIGS)
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> list[str]:
  """Names of the config files shipped in ``dsmoe.configs``."""
  folder = _shipped_folder()
  return sorted(f[:-3] for f in os.listdir(folder)
                if f.endswith(".py") and not f.startswith("_"))


def _fail(key: str, rule: str, value) -> None:
  raise ConfigError(f"config.{key}={value!r} is invalid: {rule}")


def _positive(cfg, prefix: str, keys) -> None:
  for k in keys:
    v = cfg[k]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
      _fail(f"{prefix}.{k}", "must be a positive number", v)


def _one_of(cfg, prefix: str, key: str, choices) -> None:
  if cfg[key] not in choices:
    _fail(f"{prefix}.{key}", f"must be one of {list(choices)}", cfg[key])


def _validate_fine_grained(fg) -> None:
  _positive(fg, "model.moe.fine_grained", ("N", "m", "K", "ffn_hidden"))
  if fg.K_s < 0:
    _fail("model.moe.fine_grained.K_s", "must be >= 0", fg.K_s)
  if fg.ffn_hidden % fg.m:
    _fail("model.moe.fine_grained.m", "the segmentation factor m must divide "
          f"the FFN hidden size ffn_hidden={fg.ffn_hidden}", fg.m)
  if fg.K_s >= fg.m * fg.N:
    _fail("model.moe.fine_grained.K_s", "shared experts must be fewer than "
          f"the m*N={fg.m * fg.N} total experts", fg.K_s)
  if fg.m * fg.K - fg.K_s < 1:
    _fail("model.moe.fine_grained.K", "m*K - K_s routed experts per token "
          "must be >= 1", fg.K)


def moe_sizes(e) -> dict:
  """The four MoE sizes: explicit keys win over those derived from the paper form."""
  sizes = {k: e[k] for k in EXPLICIT_SIZES}
  fg = e.fine_grained
  if fg.N > 0:
    derived = fine_grained(fg.N, fg.m, fg.K, fg.K_s, fg.ffn_hidden)
    sizes = {k: derived[k] if v is None else v for k, v in sizes.items()}
  return sizes


def _validate_moe_sizes(e) -> tuple[int, int, int, int]:
  if e.fine_grained.N > 0:
    _validate_fine_grained(e.fine_grained)
  sizes = moe_sizes(e)
  for k, v in sizes.items():
    if v is None:
      _fail(f"model.moe.{k}", "must be set (or give model.moe.fine_grained)", None)
  _positive(sizes, "model.moe", ("num_routed_experts", "top_k", "expert_hidden"))
  if sizes["num_shared_experts"] < 0:
    _fail("model.moe.num_shared_experts", "must be >= 0", sizes["num_shared_experts"])
  if sizes["top_k"] > sizes["num_routed_experts"]:
    _fail("model.moe.top_k", "must not exceed model.moe.num_routed_experts="
          f"{sizes['num_routed_experts']}", sizes["top_k"])
  return tuple(sizes[k] for k in EXPLICIT_SIZES)


def validate(config: ml_collections.ConfigDict, *, platform: str | None = None) -> None:
  """Raises one ConfigError naming the first key that breaks a rule.

  `platform`: the one the step is lowered for (default: JAX's here); the
  routed experts' settings are checked against the plan they resolve to there.
  """
  m, e, d, t = config.model, config.model.moe, config.data, config.train
  _positive(m, "model", ("vocab_size", "d_model", "num_layers", "num_heads",
                         "dense_hidden", "moe_layer_freq", "rope_theta",
                         "rms_norm_eps", "init_std"))
  if m.d_model % m.num_heads:
    _fail("model.d_model", f"must be divisible by model.num_heads={m.num_heads}", m.d_model)
  if m.head_dim < 0 or (m.head_dim == 0 and (m.d_model // m.num_heads) % 2):
    _fail("model.head_dim", "must be >= 0 and give an even head size for RoPE", m.head_dim)
  if m.head_dim % 2:
    _fail("model.head_dim", "must be even (RoPE rotates pairs)", m.head_dim)
  if m.first_k_dense_replace < 0:
    _fail("model.first_k_dense_replace", "must be >= 0", m.first_k_dense_replace)
  _one_of(m, "model", "dtype", DTYPES)
  _one_of(m, "model", "param_dtype", DTYPES)

  n_routed, n_shared, top_k, _ = _validate_moe_sizes(e)
  _one_of(e, "model.moe", "router", ROUTERS)
  _one_of(e, "model.moe", "score_fn", SCORE_FNS)
  if e.router == "hash" and top_k != 1:
    _fail("model.moe.top_k", "the hash router picks exactly one expert (top_k=1)", top_k)
  for k in ("aux_loss_alpha", "device_balance_alpha"):
    if e[k] < 0:
      _fail(f"model.moe.{k}", "balance-loss weights must be >= 0", e[k])
  _positive(e, "model.moe", ("routed_scaling_factor",))
  _validate_device_routing(e, config.mesh.expert, n_routed, top_k)
  expert_plan(config, platform)  # the routed-expert settings
  _one_of(m, "model", "remat", REMAT_POLICIES)
  if not isinstance(m.scan_layers, bool):
    _fail("model.scan_layers", "must be True or False", m.scan_layers)
  if m.scan_layers and (m.moe_layer_freq != 1 or m.num_layers <= m.first_k_dense_replace):
    _fail("model.scan_layers", "scans the MoE layers, which must be identical and "
          "consecutive: needs model.moe_layer_freq=1 and num_layers > "
          "first_k_dense_replace", m.scan_layers)
  del n_shared

  validate_data(d)
  _positive(t, "train", ("steps", "batch_size", "log_every", "checkpoint_every",
                         "learning_rate", "grad_clip"))
  if t.warmup_steps < 0:
    _fail("train.warmup_steps", "must be >= 0", t.warmup_steps)
  if t.weight_decay < 0:
    _fail("train.weight_decay", "must be >= 0", t.weight_decay)
  _one_of(t, "train", "schedule", SCHEDULES)
  _positive(t, "train", ("grad_accum_steps", "keep_checkpoints", "eval_batches"))
  for k in ("peak_flops", "eval_every"):
    if t[k] < 0:
      _fail(f"train.{k}", "must be >= 0", t[k])
  if not isinstance(t.max_skipped_fraction, (int, float)) or not 0 <= t.max_skipped_fraction <= 1:
    _fail("train.max_skipped_fraction", "must be a fraction in [0, 1] of train.steps",
          t.max_skipped_fraction)
  if not isinstance(t.init_from, str):
    _fail("train.init_from", "must be a path (a params checkpoint) or ''", t.init_from)
  if t.batch_size % t.grad_accum_steps:
    _fail("train.grad_accum_steps", "must divide train.batch_size="
          f"{t.batch_size}", t.grad_accum_steps)

  validate_mesh(config)


def validate_mesh(config: ml_collections.ConfigDict) -> None:
  """Rules of `config.mesh` and how the model and batch fit on it.

  Sizes are checked here as far as they are known; an axis of -1 is resolved
  (and checked again) when the mesh is built (dsmoe.parallel.mesh).
  """
  mesh, e, t = config.mesh, config.model.moe, config.train
  for k in MESH_AXES:
    v = mesh[k]
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      _fail(f"mesh.{k}", "must be -1 (the devices left) or a positive device count", v)
  if sum(mesh[k] == -1 for k in MESH_AXES) > 1:
    _fail("mesh", "at most one of mesh.data, mesh.fsdp, mesh.expert may be -1",
          {k: mesh[k] for k in MESH_AXES})
  known = [mesh[k] for k in MESH_AXES if mesh[k] > 0]
  if len(known) == len(MESH_AXES):
    n = mesh.data * mesh.fsdp * mesh.expert
    if t.batch_size % n:
      _fail("train.batch_size", f"must be divisible by the {n} devices of the mesh "
            f"(data x fsdp x expert = {mesh.data} x {mesh.fsdp} x {mesh.expert})",
            t.batch_size)
  if mesh.expert != 1:
    check_expert_parallel(config.model.moe, mesh.expert, moe_sizes(e)["num_routed_experts"])


def check_expert_parallel(e, expert: int, num_routed: int) -> None:
  """Rules of expert parallelism over `expert` devices (-1: not known yet)."""
  if e.impl != "dropless":
    _fail("model.moe.impl", "expert parallelism (mesh.expert > 1) runs each device's "
          "experts with the dropless path; for per-device capacity use "
          "model.moe.ep_exchange='all_to_all' with model.moe.capacity_factor", e.impl)
  if expert != -1 and num_routed % expert:
    _fail("mesh.expert", f"must divide the {num_routed} routed experts", expert)


def _validate_device_routing(e, expert: int, n_routed: int, top_k: int) -> None:
  """Device-level balance (a2), DeepSeek-V2 device-limited routing (M devices)
  and its communication balance loss (a3), over the D = mesh.expert devices."""
  m_dev = e.max_devices_per_token
  if not isinstance(m_dev, int) or isinstance(m_dev, bool) or m_dev < 0:
    _fail("model.moe.max_devices_per_token", "must be an integer >= 0 (0: no limit)", m_dev)
  if e.comm_balance_alpha < 0:
    _fail("model.moe.comm_balance_alpha", "balance-loss weights must be >= 0",
          e.comm_balance_alpha)
  if e.comm_balance_alpha > 0 and m_dev == 0:
    _fail("model.moe.comm_balance_alpha", "the communication balance loss counts "
          "tokens per device over M devices: set model.moe.max_devices_per_token",
          e.comm_balance_alpha)
  for k in ("device_balance_alpha", "max_devices_per_token"):
    if e[k] > 0 and expert < 2:
      _fail(f"model.moe.{k}", "acts on the devices of expert parallelism: needs "
            f"mesh.expert >= 2, given explicitly (it is {expert})", e[k])
  if m_dev == 0:
    return
  if e.router != "topk":
    _fail("model.moe.max_devices_per_token", "device-limited routing needs the "
          "learned router (model.moe.router='topk')", m_dev)
  if m_dev > expert:
    _fail("model.moe.max_devices_per_token", f"must be <= mesh.expert={expert}", m_dev)
  if n_routed % expert == 0 and m_dev * (n_routed // expert) < top_k:
    _fail("model.moe.max_devices_per_token", f"{m_dev} devices of {n_routed // expert} "
          f"experts each cannot hold top_k={top_k} experts", m_dev)


# The model.moe keys that resolve into the ExpertPlan (MoESpec.plan).
PLAN_KEYS = ("impl", "gmm_backend", "gmm_strategy", "block_size", "capacity_factor",
             "eval_capacity_factor", "drop_policy", "ep_exchange")
# Each platform's choice where a setting is "auto" (docs/MODEL.md has the
# table): TPUs have a native grouped matmul (ragged_dot); GPUs run a few large
# batched matmuls (each kernel launch costs); CPUs run the fused XLA loop,
# which moves the least memory. "auto" picks neither the Pallas kernels nor
# the C++ CPU kernel: both are asked for by name.
AUTO_GROUPED = {"tpu": "ragged_dot", "gpu": "batched", "cpu": "loop"}
AUTO_EXCHANGE = {"tpu": "ragged_all_to_all", "gpu": "ragged_all_to_all", "cpu": "allgather"}


def platform_of(platform: str | None) -> str:
  """"cpu", "tpu" or "gpu" (cuda and rocm): `platform`, default JAX's here."""
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.default_backend()
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  if platform not in AUTO_GROUPED:
    _fail("platform", f"must be one of {list(AUTO_GROUPED)}", platform)
  return platform


def expert_plan(config: ml_collections.ConfigDict, platform: str | None = None) -> ExpertPlan:
  """The routed experts' :class:`ExpertPlan` on `platform` (default: JAX's
  here); a setting that does not apply to that plan is refused, naming it."""
  e, platform = config.model.moe, platform_of(platform)
  _one_of(e, "model.moe", "impl", IMPLS)
  _one_of(e, "model.moe", "gmm_backend", GMM_BACKENDS)
  _one_of(e, "model.moe", "gmm_strategy", GMM_STRATEGIES)
  _one_of(e, "model.moe", "drop_policy", DROP_POLICIES)
  _one_of(e, "model.moe", "ep_exchange", ("auto", *EP_EXCHANGES))
  _positive(e, "model.moe", ("capacity_factor",))
  if not isinstance(e.eval_capacity_factor, (int, float)) or e.eval_capacity_factor < 0:
    _fail("model.moe.eval_capacity_factor", "must be >= 0 (0: no dropping)",
          e.eval_capacity_factor)
  if not isinstance(e.block_size, int) or isinstance(e.block_size, bool) or e.block_size < 0:
    _fail("model.moe.block_size", "must be an integer >= 0 (0: chosen from the shape)",
          e.block_size)
  expert_parallel = config.mesh.expert != 1
  exchange = e.ep_exchange if e.ep_exchange != "auto" else AUTO_EXCHANGE[platform]
  _check_applies(e, expert_parallel, exchange)
  grouped = "" if e.impl == "dense" else _grouped(e, platform)
  if grouped == "ragged_dot" and e.block_size:
    auto = "" if e.gmm_backend == "ragged_dot" else f" (gmm_backend='auto' on {platform})"
    _fail("model.moe.block_size", f"ragged_dot{auto} runs on the unpadded sorted rows, "
          "without blocks: set gmm_backend='blocked' or 'pallas', or block_size=0",
          e.block_size)
  if grouped == "pallas" and e.block_size and (
      e.block_size < 16 or e.block_size & (e.block_size - 1)):
    _fail("model.moe.block_size", "with gmm_backend='pallas' it is the kernels' row "
          "tile: 0 or a power of two >= 16", e.block_size)
  if grouped == "kernel":
    if platform != "cpu":
      _fail("model.moe.gmm_strategy", f"the C++ kernel runs on CPU only, not on {platform}",
            e.gmm_strategy)
    dtypes = sorted({config.model.dtype, config.model.param_dtype})
    if dtypes != ["float32"]:
      _fail("model.moe.gmm_strategy", "the C++ CPU kernel computes in float32: it needs "
            f"model.dtype and model.param_dtype 'float32' (they are {dtypes}); use 'loop'",
            e.gmm_strategy)
  if exchange == "ragged_all_to_all" and expert_parallel and platform == "cpu":
    _fail("model.moe.ep_exchange", "XLA:CPU has no ragged all-to-all: use 'allgather' "
          "(dropless) or 'all_to_all' on CPU", e.ep_exchange)
  return ExpertPlan(dispatch=e.impl, grouped=grouped, block_size=e.block_size,
                    capacity_factor=float(e.capacity_factor),
                    eval_capacity_factor=float(e.eval_capacity_factor),
                    drop_policy=e.drop_policy, ep_exchange=exchange, platform=platform)


def _grouped(e, platform: str) -> str:
  """The grouped SwiGLU implementation that gmm_backend and gmm_strategy name."""
  if e.gmm_backend in ("ragged_dot", "pallas"):
    if e.gmm_strategy != "auto":
      _fail("model.moe.gmm_strategy", "says how gmm_backend='blocked' runs; "
            f"gmm_backend={e.gmm_backend!r} has no strategy: leave it 'auto'", e.gmm_strategy)
    return e.gmm_backend
  if e.gmm_strategy != "auto":  # a strategy of "blocked" implies "blocked"
    return e.gmm_strategy
  if e.gmm_backend == "blocked":
    return "loop" if platform == "cpu" else "batched"
  return AUTO_GROUPED[platform]


_NO_GROUPED = "impl='dense' runs every expert on every token (no grouped matmul)"
_NO_DROPS = "only impl='capacity' and ep_exchange='all_to_all' drop pairs"
_WHY_UNUSED = {"gmm_backend": _NO_GROUPED, "gmm_strategy": _NO_GROUPED,
               "block_size": _NO_GROUPED, "capacity_factor": _NO_DROPS,
               "eval_capacity_factor": _NO_DROPS, "drop_policy": _NO_DROPS,
               "ep_exchange": "it is the token exchange of expert parallelism (mesh.expert > 1)"}


def _check_applies(e, expert_parallel: bool, exchange: str) -> None:
  """Refuses a routed-expert setting, changed from its default, that nothing reads."""
  defaults = base_config().model.moe
  drops = e.impl == "capacity" or (expert_parallel and exchange == "all_to_all")
  unused = {"gmm_backend": e.impl == "dense", "gmm_strategy": e.impl == "dense",
            "block_size": e.impl == "dense", "capacity_factor": not drops,
            "eval_capacity_factor": not drops, "drop_policy": not drops,
            "ep_exchange": not expert_parallel}
  for k, is_unused in unused.items():
    if is_unused and e[k] != defaults[k]:
      _fail(f"model.moe.{k}", f"does not apply here: {_WHY_UNUSED[k]}", e[k])


def validate_data(d: ml_collections.ConfigDict) -> None:
  """Rules of the `config.data` block (owned by dsmoe.data)."""
  for k in ("seq_len", "vocab_size", "tokenizer_sample_bytes", "num_threads",
            "prefetch_docs", "eval_tokens", "eval_doc_tokens"):
    if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1:
      _fail(f"data.{k}", "must be an integer >= 1", d[k])
  if not isinstance(d.prefetch_batches, int) or d.prefetch_batches < 0:
    _fail("data.prefetch_batches", "must be an integer >= 0", d.prefetch_batches)
  _one_of(d, "data", "tokenizer", ("sentencepiece", "bytes", "hf"))
  if d.tokenizer == "hf" and not d.tokenizer_path:
    _fail("data.tokenizer_path", "data.tokenizer='hf' reads a HuggingFace tokenizer.json: "
          "give its path (or its folder)", d.tokenizer_path)
  if not 0 <= d.validation_percent < 100:
    _fail("data.validation_percent", "must be in [0, 100)", d.validation_percent)
  if not d.data_dir:
    _fail("data.data_dir", "must name a folder for TFDS data and tokenizers", d.data_dir)
  if d.tfds_name and d.text_dir:
    _fail("data.text_dir", "set either data.text_dir (local_text) or "
          f"data.tfds_name={d.tfds_name!r}, not both", d.text_dir)
  ids = {"pad_id": d.pad_id, "bos_id": d.bos_id, "eos_id": d.eos_id}
  for k, v in ids.items():
    if not isinstance(v, int) or not 0 <= v < 4:
      _fail(f"data.{k}", "must be one of 0..3 (SentencePiece special ids)", v)
  if len(set(ids.values())) != 3:
    _fail("data.eos_id", "data.pad_id, bos_id and eos_id must differ", ids)
  if d.tokenizer == "sentencepiece" and d.vocab_size < 300:
    _fail("data.vocab_size", "SentencePiece BPE needs >= 300 pieces (256 byte "
          "pieces + specials + merges); use data.tokenizer='bytes' for less",
          d.vocab_size)
