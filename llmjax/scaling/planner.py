"""The compute-optimal planner: from a budget to a model, its data, memory and wall time.

Under a fitted law L(N, D) = E + A/N^alpha + B/D^beta (`scaling/fit.py`: a sweep's own, or
the published Chinchilla and Epoch ones) and C = 6 N D, the loss-minimising split of a
FLOP budget is N_opt = G (C/6)^a, D_opt = (C/6)^b / G (Hoffmann et al. 2022, eq. 4).
Given params or tokens instead, the budget that makes them optimal is solved for.

The planner then picks a model shape from a preset family whose N is closest to N_opt
(aspect ratio D/L between 32 and 256, widths a multiple of the head size: Kaplan et al.
2020 found the loss flat over a wide range of shapes at fixed N), and for each sharding
strategy reports the memory per device from the estimator (`scaling/memory.py`) and the
wall time at a stated model-FLOPs utilisation: C / (devices x peak FLOP/s x MFU).
"""

import dataclasses
import math

from llmjax.errors import UserError

# Peak dense bf16 FLOP/s per chip (vendor figures; the CPU figure is this project's 2-core
# AVX-512 float32 rate, RuntimeConfig.peak_flops).
DEVICE_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v4": 275e12,
                "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "cpu": 256e9}
FAMILIES = {"gpt2": "gpt2-124m", "llama": "llama-style-small"}
STRATEGIES = ("dp", "zero1", "fsdp", "fsdp_tp")


def load_law(name_or_path: str):
  """'chinchilla', 'epoch', or a fit.json written by `llmjax sweep fit` -> (Law, params
  convention: 'total' or 'non_embedding')."""
  import json
  import os

  from llmjax.scaling import fit

  if name_or_path in fit.PUBLISHED:
    return fit.PUBLISHED[name_or_path], "total"  # both papers count every parameter
  if not os.path.exists(name_or_path):
    raise UserError(f"--law={name_or_path!r} is neither a published law "
                    f"({sorted(fit.PUBLISHED)}) nor a fit.json file.")
  with open(name_or_path, encoding="utf-8") as f:
    data = json.load(f)
  if "approach3" not in data:
    raise UserError(f"{name_or_path} has no Approach-3 law; write one with "
                    "`llmjax sweep fit`.")
  return fit.Law.from_dict(data["approach3"]["law"]), data.get("params", "non_embedding")


def allocation(law, flops=None, params=None, tokens=None, k: float = 6.0):
  """(C, N, D) compute-optimal under `law`, from exactly one of the three."""
  given = [x for x in (flops, params, tokens) if x is not None]
  if len(given) != 1:
    raise UserError("give exactly one of --flops, --params or --tokens.")
  if min(given) <= 0:
    raise UserError("--flops, --params and --tokens must be positive.")
  n1, d1 = law.optimal(k)  # the optimum at C = k (N D = 1): N_opt = n1 (C/k)^a
  if params is not None:
    flops = k * (params / n1) ** (1 / law.a)
  elif tokens is not None:
    flops = k * (tokens / d1) ** (1 / law.b)
  n, d = law.optimal(flops, k)
  return float(flops), float(n), float(d)


def _approx_params(cfg) -> dict:
  """Closed-form counts (weights only; biases and norms are < 1% at these widths)."""
  d, h = cfg.embed_dim, cfg.head_dim or cfg.embed_dim // cfg.num_heads
  kv = cfg.num_kv_heads or cfg.num_heads
  gated = cfg.activation in ("swiglu", "geglu", "reglu")
  mlp = (3 if gated else 2) * d * cfg.mlp_dim
  layer = d * (cfg.num_heads + 2 * kv) * h + cfg.num_heads * h * d + mlp
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  if cfg.position == "learned":
    embed += cfg.max_len * d
  body = cfg.num_layers * layer
  return {"non_embedding": body, "total": body + embed}


def _family_shape(base, num_layers: int, embed_dim: int, head_dim: int):
  gated = base.activation in ("swiglu", "geglu", "reglu")
  mlp = max(128, round(embed_dim * 8 / 3 / 128) * 128) if gated else 4 * embed_dim  # LLaMA: ~8D/3
  heads = embed_dim // head_dim
  kv = None
  if base.num_kv_heads:  # keep the family's grouping ratio
    kv = max(1, heads * base.num_kv_heads // base.num_heads)
    while heads % kv:
      kv -= 1
  return base.replace(num_layers=num_layers, embed_dim=embed_dim, num_heads=heads,
                      num_kv_heads=kv, head_dim=None, mlp_dim=mlp)


def shape_for(n_target: float, family: str = "gpt2", *, convention: str = "total",
              vocab_size: int | None = None, seq_len: int = 2048):
  """The family's shape (num_layers x embed_dim) whose `convention` count is closest to
  `n_target`, checked with the exact count (`counts.param_counts`)."""
  from llmjax.models.presets import get_preset
  from llmjax.scaling import counts

  if family not in FAMILIES:
    raise UserError(f"unknown --family={family!r}; choose one of {sorted(FAMILIES)}.")
  base = get_preset(FAMILIES[family], max_len=seq_len,
                    **({"vocab_size": vocab_size} if vocab_size else {}))
  # Per width D: ~12 D^2 weights a layer, plus e D in the embedding tables (total only).
  e = 0 if convention == "non_embedding" else (
      base.vocab_size * (1 if base.tie_embeddings else 2)
      + (seq_len if base.position == "learned" else 0))
  candidates = []
  for layers in range(1, 161):
    for head_dim in (64, 128):
      ideal = (math.sqrt(e * e + 48 * layers * max(n_target, 1.0)) - e) / (24 * layers)
      for dim in {max(head_dim, int(ideal / head_dim) * head_dim),
                  max(head_dim, int(ideal / head_dim + 1) * head_dim)}:
        if 32 <= dim / layers <= 256 and (head_dim == 128) == (dim >= 2048):
          cfg = _family_shape(base, layers, dim, head_dim)
          candidates.append((abs(math.log(_approx_params(cfg)[convention] / n_target)), cfg))
  if not candidates:
    raise UserError(f"no {family} shape has about {n_target:.3g} parameters; the family's "
                    "smallest has one layer of width 64.")
  best = sorted(candidates, key=lambda c: c[0])[:3]
  exact = [(abs(math.log(counts.param_counts(c)[convention] / n_target)), c) for _, c in best]
  return min(exact, key=lambda c: c[0])[1]


@dataclasses.dataclass(frozen=True)
class Plan:
  flops: float
  params: float          # N_opt under the law (its convention)
  tokens: float          # D_opt
  loss: float            # the law's loss at the optimum
  model: object          # the chosen TransformerConfig
  model_params: dict     # its exact counts
  steps: int             # D_opt / (batch x seq_len)
  hours: float           # wall time at the MFU on `devices`
  memory: list           # (strategy, mesh dict, MemoryEstimate | error string)


def make_plan(law, convention, *, flops=None, params=None, tokens=None, family="gpt2",
              vocab_size=None, seq_len=2048, batch_size=256, devices=8,
              peak_flops=DEVICE_FLOPS["h100"], mfu=0.4) -> Plan:
  from llmjax.scaling import counts, memory

  c, n, d = allocation(law, flops, params, tokens)
  cfg = shape_for(n, family, convention=convention, vocab_size=vocab_size, seq_len=seq_len)
  rows = []
  for rule_set in STRATEGIES:
    tensor = 2 if rule_set == "fsdp_tp" else 1
    mesh = {"data": devices if rule_set in ("dp", "zero1") else 1,
            "fsdp": 1 if rule_set in ("dp", "zero1") else devices // tensor, "tensor": tensor}
    try:
      rows.append((rule_set, mesh, memory.estimate(cfg, rule_set, mesh, batch_size, seq_len)))
    except UserError as e:  # e.g. the batch does not split over this mesh
      rows.append((rule_set, mesh, str(e)))
  seconds = c / (devices * peak_flops * mfu)
  return Plan(c, n, d, float(law.loss(n, d)), cfg, counts.param_counts(cfg),
              max(1, round(d / (batch_size * seq_len))), seconds / 3600, rows)
