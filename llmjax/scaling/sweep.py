"""Scaling-law sweeps: a sweep config -> a manifest of ordinary training runs -> results.

Two designs, as in Hoffmann et al. 2022 ("Training Compute-Optimal Large Language
Models"):

  isoflop  every FLOP budget C x every model shape: each run trains for D = C / (FLOPs per
           token) tokens, so the runs of one budget cost the same (Approach 2's profiles);
  grid     every shape x every token count (Approach 3 fits L(N, D) over the grid).

A run is an ordinary `llmjax train` in its own workdir under `<sweep_dir>/runs/`, with the
sweep's gin files plus a few bindings (shape, steps, cadences, the sweep's one tokenizer):
everything a run does can be re-run by hand from its manifest row. FLOPs are the exact
matmul count of `scaling/counts.py` (3 x forward, attention over the full square); N is
reported both with and without the embedding tables (Kaplan et al. 2020 fit the latter,
Chinchilla the former).

The manifest (`manifest.json`) is plain JSON a person may edit; `validate_rows` checks
every row against the model and mesh before any run starts. Executors live in
`scaling/executors.py`; the fits read `collect`'s records (`scaling/fit.py`).
"""

import dataclasses
import hashlib
import json
import math
import os

from llmjax.errors import UserError

MANIFEST = "manifest.json"
RESULT = "sweep_result.json"  # written into a run's workdir when it finished


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What a sweep gin file binds as `SweepConfig.*` (gin_configs/sweeps/)."""

  mode: str = "isoflop"           # isoflop: budgets x shapes | grid: shapes x tokens
  budgets: tuple = ()             # training FLOPs per run (isoflop)
  tokens: tuple = ()              # training tokens per run (grid)
  shapes: tuple = ()              # (num_layers, embed_dim) pairs
  head_dim: int = 32              # num_heads = embed_dim // head_dim
  mlp_ratio: float = 4.0          # mlp_dim = mlp_ratio * embed_dim (rounded to 8)
  min_steps: int = 20             # isoflop: a shape needing fewer steps is left out
  max_steps: int = 1_000_000      # ... and one needing more
  tokens_per_param: tuple = (0.0, float("inf"))  # isoflop: keep runs whose D / N (N
                                  # non-embedding) lies in this range: each budget's
                                  # window of shapes then sits around its optimum
  warmup_fraction: float = 0.05   # warmup steps = this x num_steps (at least 1)
  evals_per_run: int = 4          # eval cadence: num_steps / this (and the last step)
  logs_per_run: int = 20          # training-loss records per run (Approach 1's curves)


def _mlp_dim(embed_dim: int, ratio: float) -> int:
  return max(8, round(embed_dim * ratio / 8) * 8)


def shape_config(base, num_layers: int, embed_dim: int, sweep: SweepConfig):
  """The base TransformerConfig at one sweep shape."""
  if embed_dim % sweep.head_dim:
    raise UserError(f"sweep shape ({num_layers}, {embed_dim}): embed_dim is not a multiple of "
                    f"SweepConfig.head_dim={sweep.head_dim}; change the shape or the head_dim.")
  return base.replace(num_layers=num_layers, embed_dim=embed_dim,
                      num_heads=embed_dim // sweep.head_dim, num_kv_heads=None, head_dim=None,
                      mlp_dim=_mlp_dim(embed_dim, sweep.mlp_ratio))


def plan_rows(sweep: SweepConfig, base, seq_len: int, batch_size: int) -> list[dict]:
  """One row per run: shape, N (total, non-embedding), D, C and the run's bindings.

  `base` is the run's TransformerConfig with the sweep tokenizer's vocabulary."""
  from llmjax.scaling import counts

  if sweep.mode not in ("isoflop", "grid"):
    raise UserError(f"SweepConfig.mode={sweep.mode!r}; use 'isoflop' or 'grid'.")
  if not sweep.shapes:
    raise UserError("SweepConfig.shapes is empty; bind a list of (num_layers, embed_dim).")
  targets = sweep.budgets if sweep.mode == "isoflop" else sweep.tokens
  if not targets:
    raise UserError(f"SweepConfig.{'budgets' if sweep.mode == 'isoflop' else 'tokens'} is "
                    f"empty; a {sweep.mode} sweep needs at least one.")
  tokens_per_step = seq_len * batch_size
  rows = []
  for target in targets:
    for num_layers, embed_dim in sweep.shapes:
      cfg = shape_config(base, int(num_layers), int(embed_dim), sweep)
      per_token = counts.flops_per_token(cfg, seq_len)
      wanted = float(target) / per_token if sweep.mode == "isoflop" else float(target)
      steps = max(1, round(wanted / tokens_per_step))
      n = counts.param_counts(cfg)
      tokens = steps * tokens_per_step
      lo, hi = sweep.tokens_per_param
      if sweep.mode == "isoflop" and not (sweep.min_steps <= steps <= sweep.max_steps
                                          and lo <= tokens / n["non_embedding"] <= hi):
        continue  # this budget is too small or too large for this shape
      rows.append({
          # The id names the run, not its place: a sweep re-planned with more shapes or
          # budgets keeps its finished runs.
          "id": f"L{num_layers}_D{embed_dim}_" + (
              f"C{float(target):.2e}" if sweep.mode == "isoflop" else f"T{float(target):.2e}"),
          "num_layers": cfg.num_layers, "embed_dim": cfg.embed_dim,
          "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim,
          "params": n["total"], "non_embedding_params": n["non_embedding"],
          "tokens": tokens, "flops": per_token * tokens, "flops_per_token": per_token,
          "budget": float(target) if sweep.mode == "isoflop" else None,
          "num_steps": steps, "bindings": run_bindings(cfg, steps, sweep)})
  ids = [r["id"] for r in rows]
  if len(set(ids)) < len(ids):
    raise UserError(f"SweepConfig lists a shape or budget twice ({sorted(ids)}); remove the "
                    "repeat.")
  if not rows:
    raise UserError("no sweep run fits between SweepConfig.min_steps and max_steps; "
                    "raise the budgets or use smaller shapes.")
  return rows


def run_bindings(cfg, steps: int, sweep: SweepConfig) -> list[str]:
  """The gin bindings that make the sweep's base run into this row's run."""
  every = lambda k: max(1, steps // max(1, k))
  return [f"get_preset.num_layers={cfg.num_layers}", f"get_preset.embed_dim={cfg.embed_dim}",
          f"get_preset.num_heads={cfg.num_heads}", f"get_preset.mlp_dim={cfg.mlp_dim}",
          f"TrainConfig.num_steps={steps}",
          f"OptimizerConfig.warmup_steps={max(1, int(steps * sweep.warmup_fraction))}",
          f"TrainConfig.eval_every={every(sweep.evals_per_run)}",
          f"TrainConfig.log_every={every(sweep.logs_per_run)}",
          f"TrainConfig.checkpoint_every={every(sweep.evals_per_run)}",
          "TrainConfig.progress_bar=False"]


def binding_values(row: dict) -> dict:
  """`{'get_preset.num_layers': 4, ...}` from a row's bindings (numbers parsed)."""
  out = {}
  for b in row["bindings"]:
    key, _, value = b.partition("=")
    try:
      out[key.strip()] = json.loads(value)
    except ValueError:
      out[key.strip()] = value.strip()
  return out


def validate_rows(manifest: dict, base, mesh_shape: dict) -> None:
  """Every row's shape must build: heads divide the width and the tensor axis, the rows
  fit the learned position table, the batch splits over the mesh. One error lists all."""
  problems = []
  batch, seq_len = manifest["batch_size"], manifest["seq_len"]
  split = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  if batch % split:
    problems.append(f"the global batch {batch} does not split over data x fsdp = {split}")
  for row in manifest["rows"]:
    v = binding_values(row)
    dim, heads = v.get("get_preset.embed_dim", 0), v.get("get_preset.num_heads", 0)
    if not isinstance(dim, int) or not isinstance(heads, int) or heads < 1 or dim % heads:
      problems.append(f"{row['id']}: embed_dim={dim} is not a multiple of num_heads={heads}")
    elif heads % mesh_shape.get("tensor", 1):
      problems.append(f"{row['id']}: num_heads={heads} does not split over the tensor axis "
                      f"({mesh_shape['tensor']})")
    max_len = v.get("get_preset.max_len", base.max_len)
    if base.position == "learned" and seq_len > max_len:
      problems.append(f"{row['id']}: seq_len {seq_len} exceeds max_len {max_len}")
    if not isinstance(v.get("TrainConfig.num_steps"), int) or v["TrainConfig.num_steps"] < 1:
      problems.append(f"{row['id']}: TrainConfig.num_steps must be a positive integer")
  if problems:
    raise UserError("the sweep manifest has runs that cannot start (nothing was run):\n  "
                    + "\n  ".join(problems) + "\nFix these rows in manifest.json or re-plan "
                    "with `llmjax sweep plan`.")


def write_manifest(sweep_dir: str, manifest: dict) -> str:
  path = os.path.join(sweep_dir, MANIFEST)
  os.makedirs(sweep_dir, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def read_manifest(sweep_dir: str) -> dict:
  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    raise UserError(f"no sweep manifest at {path}; create one with `llmjax sweep plan "
                    f"--gin_file=... --sweep_dir={sweep_dir}`.")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}); fix the edit or re-plan.") from None
  missing = {"gin_files", "gin_params", "rows", "seq_len", "batch_size"} - set(manifest)
  if missing:
    raise UserError(f"{path} lacks {sorted(missing)}; re-plan with `llmjax sweep plan`.")
  return manifest


def workdir(sweep_dir: str, row: dict) -> str:
  return os.path.join(sweep_dir, "runs", row["id"])


def train_command(sweep_dir: str, manifest: dict, row: dict, python: str) -> list[str]:
  """The `llmjax train` command line of one run (what every executor launches)."""
  params = [*manifest["gin_params"], *row["bindings"]]
  if manifest.get("tokenizer"):
    params.append(f"TokenizerSpec.path={os.path.join(sweep_dir, manifest['tokenizer'])!r}")
  return [python, "-m", "llmjax.cli", "train",
          *[f"--gin_file={f}" for f in manifest["gin_files"]],
          *[f"--gin_param={p}" for p in params],
          f"--workdir={workdir(sweep_dir, row)}", "--no_sample"]


def status(sweep_dir: str, row: dict) -> str:
  """'done' (finished, its result written), 'partial' (checkpoints: resumes) or 'pending'."""
  wd = workdir(sweep_dir, row)
  if os.path.exists(os.path.join(wd, RESULT)):
    return "done"
  ckpts = os.path.join(wd, "checkpoints")
  if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
    return "partial"
  return "pending"


def read_metrics(wd: str) -> list[dict]:
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def finish(sweep_dir: str, row: dict, seconds: float) -> dict | None:
  """After a run exits 0: its final eval loss into `sweep_result.json` (None if the run
  stopped before its last step, e.g. TrainConfig.stop_at_step)."""
  wd = workdir(sweep_dir, row)
  evals = [r for r in read_metrics(wd) if "eval_loss" in r and r["step"] == row["num_steps"]]
  if not evals:
    return None
  result = {"id": row["id"], "eval_loss": evals[-1]["eval_loss"], "seconds": seconds}
  with open(os.path.join(wd, RESULT), "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


def collect(sweep_dir: str, manifest: dict) -> list[dict]:
  """One record per run: the row, `eval_loss` (None until it finished), `bits_per_byte`
  (when the manifest knows the validation split's bytes per token) and its training
  curve (`curve_tokens`, `curve_flops`, `curve_loss` at the logged steps)."""
  records = []
  tokens_per_step = manifest["seq_len"] * manifest["batch_size"]
  bytes_per_token = manifest.get("bytes_per_token")
  for row in manifest["rows"]:
    metrics = read_metrics(workdir(sweep_dir, row))
    done = status(sweep_dir, row) == "done"
    final = [r["eval_loss"] for r in metrics if "eval_loss" in r and r["step"] == row["num_steps"]]
    loss = final[-1] if done and final else None
    train = [r for r in metrics if "loss" in r and r["step"] <= row["num_steps"]]
    steps = [r["step"] for r in train]
    records.append({
        **row, "eval_loss": loss, "tokenizer_sha": manifest.get("tokenizer_sha"),
        "bits_per_byte": (loss / math.log(2) / bytes_per_token
                          if loss is not None and bytes_per_token else None),
        "curve_tokens": [s * tokens_per_step for s in steps],
        "curve_flops": [s * tokens_per_step * row["flops_per_token"] for s in steps],
        "curve_loss": [r["loss"] for r in train]})
  return records


def file_sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def bytes_per_token(texts, tokenizer, limit: int = 2000) -> float:
  """UTF-8 bytes per token (+1 EOS per document, as the packer appends one) over up to
  `limit` documents: turns nats per token into bits per byte, so sweeps with different
  tokenizers can be fitted together."""
  n_bytes = n_tokens = 0
  for i, text in enumerate(texts):
    if i >= limit:
      break
    n_bytes += len(text.encode("utf-8"))
    n_tokens += len(tokenizer.encode(text)) + 1
  if not n_tokens:
    raise UserError("the validation split is empty: cannot measure bytes per token.")
  return n_bytes / n_tokens
