"""Parameter and FLOP counts (Kaplan et al. 2020, §2.1; PaLM appendix B for attention).

Two levels of exactness:

  `count_params`, `train_flops_per_token`  the usual rule of thumb: 6N + 12·L·D·T per
                                           trained token from a parameter count.
  `param_counts`, `forward_flops`,         exact figures from a `TransformerConfig`,
  `train_flops`, `flops_per_token`         for all three architectures.

Parameters (`param_counts`) are counted from the abstract tree of `Transformer.init`
(`jax.eval_shape`: nothing is allocated). `total` is every parameter, the tied table
once: Chinchilla's N (Hoffmann et al. 2022). `non_embedding` is Kaplan's N, which leaves
out "all vocabulary and positional embeddings" (their N ≈ 12·L·D² has no vocabulary
term): the token table, token-type table, learned position table, T5's relative bias
tables, and an untied output head (`lm_head`, `logits_bias`), which is the vocabulary
embedding on the output side (GPT-2, which Kaplan trained, ties it).

FLOPs (`forward_flops`) count matmuls only, 2·m·n·k per product, of one forward pass
as the network computes it (the einsum / 'jax' attention paths):
  - every weight product: q/k/v (k and v have K·H outputs, GQA), attention output,
    MLP (3 matrices when gated: swiglu, geglu), BERT's `mlm_head` transform;
  - attention scores QKᵀ and values AV over the whole L×S rectangle: masked scores
    are computed too (`causal_chunks` > 1 skips whole blocks of them and is counted
    as it runs). `causal` is the same total with causal self-attention's scores and
    values halved (PaLM's convention; the closer figure for 'cudnn' and 'cpu_flash',
    which skip masked blocks themselves);
  - the logits product D·V per position, tied or not, over V padded to
    `logits_pad_to` (the padded columns are multiplied too);
  - embedding and position lookups are gathers, T5's relative bias a gather and an
    add: no matmul FLOPs. `classify`'s pooled head (2·D² + 2·D·C per row) is not part
    of the forward pass counted here, which is `Transformer.__call__`.
Norms, activations, softmax, masks and the loss are left out. XLA's cost analysis
counts them (elementwise ops as FLOPs, dots as 2·m·n·k), so ours is a lower bound on it:
at D=256, F=1024, T=128, V=512 the forward is 0.99 of XLA's count for GPT-, LLaMA- and
T5-style models, 0.955 for BERT, whose erf GELU XLA expands into a polynomial
(tests/scaling/test_counts.py). Training is 3× the forward (`train_flops`: the
backward pass computes two products per forward product, Kaplan §2.1 / Chinchilla
appendix F): 0.98-0.99 of XLA's count of the loss gradient, BERT 0.976.
Rematerialization recomputes more, which these model FLOPs leave out (the MFU / HFU
distinction of PaLM, appendix B).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig
from llmjax.models.transformer import Transformer

# Parameter-path prefixes that `param_counts` leaves out of Kaplan's non-embedding N.
_EMBEDDING = (("embed",), ("token_type_embed",))
_POSITION = (("pos_embed",), ("encoder", "relpos_bias"), ("decoder", "relpos_bias"))
_HEAD = (("lm_head",), ("logits_bias",))
_LENGTH_KEYS = {"decoder_only": ("tokens",), "encoder_only": ("tokens",),
                "encoder_decoder": ("inputs", "targets")}


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def train_flops_per_token(num_params: int, num_layers: int, embed_dim: int, seq_len: int,
                          *, causal_halved: bool = False) -> float:
  attention = 12 * num_layers * embed_dim * seq_len
  return 6 * num_params + (attention / 2 if causal_halved else attention)


def _abstract_params(cfg):
  """The parameter tree of `Transformer(cfg)` as shapes: every method's parameters
  (`__call__`, and `classify` when `num_classes`)."""
  tokens = jnp.zeros((1, 1), jnp.int32)

  def init_all(module):
    if cfg.arch == "encoder_decoder":
      module(tokens, encoder_tokens=tokens)
    else:
      module(tokens)
    if cfg.num_classes and cfg.arch != "decoder_only":
      module.classify(tokens)

  variables = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), method=init_all))
  return nn.unbox(variables)["params"]


def param_counts(cfg: TransformerConfig) -> dict:
  """Parameters of `Transformer(cfg)`: `total` (Chinchilla's N), `non_embedding`
  (Kaplan's N) and what lies between them, `embedding` (token and token-type tables,
  a tied table once), `position` (learned and T5 relative tables) and `head` (an untied
  output layer and the logits bias). See the module docstring for the convention."""
  parts = {"total": 0, "embedding": 0, "position": 0, "head": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]:
    names = tuple(getattr(key, "key", str(key)) for key in path)
    size = math.prod(leaf.shape)
    parts["total"] += size
    for part, prefixes in (("embedding", _EMBEDDING), ("position", _POSITION),
                           ("head", _HEAD)):
      if any(names[:len(p)] == p for p in prefixes):
        parts[part] += size
  parts["non_embedding"] = (parts["total"] - parts["embedding"] - parts["position"]
                            - parts["head"])
  return parts


def _causal_pairs(cfg, length: int) -> int:
  """Query-key pairs the einsum path scores in causal self-attention of `length`:
  chunk i of `causal_chunks` against the keys up to its end (as
  `kernels.attention_impls.attention` splits them), all of them without chunks."""
  bounds = np.linspace(0, length, min(cfg.causal_chunks, length) + 1).round().astype(int)
  return int(sum((end - start) * end for start, end in itertools.pairwise(bounds)))


def _attention(cfg, b: int, lq: int, lk: int, pairs: int, prefix: str = "") -> dict:
  """Matmul FLOPs of one attention layer: `b` rows of `lq` queries and `lk` keys,
  `pairs` query-key pairs scored (lq·lk unless causal chunks skip some)."""
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return {prefix + "qkv": 2 * b * d * h * (n * lq + 2 * k * lk),
          prefix + "scores": 2 * b * n * h * pairs,
          prefix + "values": 2 * b * n * h * pairs,
          prefix + "attention_out": 2 * b * lq * n * h * d}


def _add(total: dict, part: dict, times: int = 1):
  for key, value in part.items():
    total[key] = total.get(key, 0) + times * value


def _stack(flops: dict, cfg, layers: int, b: int, length: int, causal: bool,
           encoder_len: int | None = None) -> int:
  """Adds `layers` blocks over `length` positions to `flops`; returns what halving
  causal self-attention's full score square would save (0 for a bidirectional stack)."""
  impl_chunks = causal and cfg.attention_impl in ("einsum", "jax")
  pairs = _causal_pairs(cfg, length) if impl_chunks else length * length
  _add(flops, _attention(cfg, b, length, length, pairs), layers)
  if encoder_len is not None:
    _add(flops, _attention(cfg, b, length, encoder_len, length * encoder_len, "cross_"),
         layers)
  matrices = 3 if cfg.gated else 2
  _add(flops, {"mlp": 2 * b * length * cfg.embed_dim * cfg.mlp_dim * matrices}, layers)
  if not causal:
    return 0
  # scores + values: 2·2·b·N·H per pair, of `pairs` computed vs half the square
  return layers * 2 * b * cfg.num_heads * cfg.head_dim * (2 * pairs - length * length)


def _lengths(cfg, lengths) -> tuple[int, ...]:
  keys = _LENGTH_KEYS[cfg.arch]
  missing = [key for key in keys if key not in lengths]
  if missing:
    raise UserError(f"forward_flops for arch={cfg.arch!r} needs lengths {list(keys)} "
                    f"(the objective's feature_lengths), got {dict(lengths)}; add {missing}.")
  return tuple(int(lengths[key]) for key in keys)


def forward_flops(cfg: TransformerConfig, lengths, batch_size: int = 1) -> dict:
  """Matmul FLOPs of one forward pass of `batch_size` rows, by part.

  `lengths`: {'tokens': T} (decoder_only, encoder_only) or {'inputs': S, 'targets': T}
  (encoder_decoder), the objectives' feature names. Parts: `qkv`, `scores`, `values`,
  `attention_out`, `mlp`, `head` (logits), `mlm_head` (BERT), `cross_*` (the decoder's
  cross-attention), `total`, and `causal` (total with causal self-attention halved).
  Conventions: the module docstring.
  """
  b, flops = batch_size, {}
  if cfg.arch == "encoder_decoder":
    inputs, targets = _lengths(cfg, lengths)
    _stack(flops, cfg, cfg.num_encoder_layers, b, inputs, causal=False)
    saving = _stack(flops, cfg, cfg.num_layers, b, targets, causal=True, encoder_len=inputs)
    head_len = targets
  else:
    (head_len,) = _lengths(cfg, lengths)
    saving = _stack(flops, cfg, cfg.num_layers, b, head_len,
                    causal=cfg.arch == "decoder_only")
    if cfg.arch == "encoder_only" and cfg.mlm_head:
      flops["mlm_head"] = 2 * b * head_len * cfg.embed_dim * cfg.embed_dim
  padded_vocab = -(-cfg.vocab_size // cfg.logits_pad_to) * cfg.logits_pad_to
  flops["head"] = 2 * b * head_len * cfg.embed_dim * padded_vocab
  flops["total"] = sum(flops.values())
  flops["causal"] = flops["total"] - saving
  return flops


def train_flops(cfg: TransformerConfig, lengths, batch_size: int = 1, *,
                causal: bool = False) -> float:
  """Matmul FLOPs of one training step's forward and backward pass: 3 × `forward_flops`
  (`total`, or `causal`). The backward pass runs two products per forward product (the
  gradients of both operands); the embedding gather's backward is a scatter-add."""
  return 3 * forward_flops(cfg, lengths, batch_size)["causal" if causal else "total"]


def flops_per_token(cfg: TransformerConfig, seq_len: int, *, causal: bool = False) -> float:
  """Training FLOPs per token of rows of `seq_len` tokens (decoder_only, encoder_only):
  the C = flops_per_token · D of a compute budget, exact where 6N + 12·L·D·T
  (`train_flops_per_token`) approximates."""
  if cfg.arch == "encoder_decoder":
    raise UserError("flops_per_token needs one sequence length (decoder_only or "
                    "encoder_only); for encoder_decoder use train_flops(cfg, "
                    "{'inputs': S, 'targets': T}) and divide by the tokens you count.")
  return train_flops(cfg, {"tokens": seq_len}, causal=causal) / seq_len
