"""`TransformerConfig`: the one frozen description of every network llmjax builds.

One dataclass covers decoder-only (GPT, LLaMA), encoder-only (BERT) and encoder-decoder
(T5) models; `arch` picks which stacks `Transformer` builds. Gin binds it by constructor
argument, so every field is a plain Python value (dtypes are strings such as 'bfloat16').

Derived defaults: `head_dim=None` means `embed_dim // num_heads`, `num_kv_heads=None`
means `num_heads` (multi-head attention), `attention_dropout_rate=None` means
`dropout_rate`, and `num_encoder_layers=None` means `num_layers`. They are resolved in
`__post_init__`; use `config.replace(...)` (not `dataclasses.replace`) so that a field
left to its default is re-derived from the new values.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.layers.position import RopeScaling

ARCHS = ("decoder_only", "encoder_only", "encoder_decoder")
# 't5_relative': T5's bucketed relative attention bias (Raffel et al. 2020, sec. 2.1),
# shared by all layers of a stack (see llmjax/layers/position.py).
POSITIONS = ("learned", "sinusoidal", "rope", "none", "t5_relative")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn", "dynamic")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
# 'gelu' is the tanh approximation (GPT-2's "gelu_new", jax.nn.gelu's default);
# 'gelu_exact' is the erf form (torch.nn.GELU(), BERT, nanoGPT). 'swiglu' and 'geglu'
# are gated (Shazeer 2020, "GLU Variants Improve Transformer"); 'geglu' gates with the
# tanh GELU, as T5 v1.1 ("gated-gelu") does.
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
REMATS = ("none", "full", "dots")
# 'einsum': llmjax's own softmax core (layers/attention.py); 'jax': jax.nn.dot_product_attention
# (XLA's); 'cudnn': the same with implementation='cudnn', cuDNN's fused flash attention
# (NVIDIA GPUs, bfloat16/float16). 'jax' and 'cudnn' fall back to 'einsum' under attention
# dropout. See benchmarks/README.md for which is faster where.
ATTENTION_IMPLS = ("einsum", "jax", "cudnn", "cpu_flash")
DTYPES = ("float32", "bfloat16", "float16")

# Fields whose `None` default is derived from other fields in `__post_init__`.
_DERIVED = ("head_dim", "num_kv_heads", "attention_dropout_rate", "num_encoder_layers",
            "qkv_bias")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]):
  if value not in choices:
    raise UserError(
        f"TransformerConfig.{name}={value!r} is not supported; set {name} to one of "
        f"{', '.join(repr(c) for c in choices)}.")


def _check_positive(name: str, value: Any):
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UserError(f"TransformerConfig.{name}={value!r} must be a positive integer; "
                    f"set {name} to a value >= 1.")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of a Transformer (shape letters: D N K H F V, see layers/)."""

  arch: str = "decoder_only"        # 'decoder_only' | 'encoder_only' | 'encoder_decoder'
  vocab_size: int = 128             # V
  embed_dim: int = 64               # D
  num_layers: int = 2               # layers of the decoder (of the encoder if encoder_only)
  num_heads: int = 4                # N
  num_kv_heads: int | None = None   # K; None = num_heads (MHA), 1 = multi-query
  head_dim: int | None = None       # H; None = embed_dim // num_heads
  mlp_dim: int = 256                # F
  max_len: int = 64                 # rows of the learned position table
  dropout_rate: float = 0.0         # embeddings and residual branches
  attention_dropout_rate: float | None = None  # attention probabilities; None = dropout_rate
  dtype: str = "float32"            # compute dtype of activations
  param_dtype: str = "float32"      # storage dtype of parameters
  logits_dtype: str = "float32"     # dtype of returned logits (the loss wants float32)
  logits_pad_to: int = 1            # the logits product runs over V padded (zero rows) to a
                                    # multiple of this, sliced back: GPU tiles divide it
                                    # (GPT-2's 50257 -> 50304 at 128); params unchanged
  position: str = "learned"         # 'learned' | 'sinusoidal' | 'rope' | 'none'
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"        # 'none' | 'linear' | 'llama3' | 'yarn' | 'dynamic'
                                    # (layers/position.py RopeScaling says what each does)
  rope_factor: float = 1.0          # how much longer the context is (every scaling)
  rope_low_freq_factor: float = 1.0   # llama3: wavelengths > original_max_len / this stretch
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original_max_len / this stay
  rope_original_max_len: int = 8192   # llama3, yarn, dynamic: the pre-training context
  rope_beta_fast: float = 32.0      # yarn: dims turning more often than this extrapolate
  rope_beta_slow: float = 1.0       # yarn: dims turning less often than this interpolate
  rope_truncate: bool = True        # yarn: round the ramp's bounds to whole dims
  rope_attention_factor: float = 1.0  # yarn: cos/sin multiplier (0.1 ln(factor) + 1)
  sliding_window: int = 0           # decoder self-attention sees the last W positions
                                    # only, itself included (Mistral); 0 = all
  relative_buckets: int = 32        # t5_relative: buckets of the relative position bias
  relative_max_distance: int = 128  # t5_relative: distances beyond share the last bucket
  query_scale: float | None = None  # q.k multiplier; None = 1/sqrt(H) (T5 uses 1.0)
  norm: str = "layernorm"           # 'layernorm' | 'rmsnorm'
  norm_position: str = "pre"        # 'pre' (GPT-2, LLaMA) | 'post' (BERT, Vaswani)
  norm_eps: float = 1e-5
  final_norm: bool = True           # norm after the last block (pre-norm models)
  embed_norm: bool = False          # norm after the embeddings (BERT)
  activation: str = "gelu"
  use_bias: bool = True             # biases in projections, MLP and LayerNorm
  qkv_bias: bool | None = None      # biases in the q/k/v projections; None = use_bias
                                    # (Qwen2: True with use_bias=False)
  tie_embeddings: bool = True       # logits = x @ embedding.T
  scale_embeddings: bool = False    # multiply token embeddings by sqrt(D)
  logits_scale: float = 1.0         # multiplies the final states before the logits
                                    # product (T5 v1.0's tied head: D ** -0.5)
  init_std: float = 0.02            # normal init of embeddings and projections (GPT-2)
  remat: str = "none"               # 'none' | 'full' | 'dots'
  attention_impl: str = "einsum"    # 'einsum' | 'jax' | 'cudnn' | 'cpu_flash' (C++ kernel)
  causal_chunks: int = 1            # decoder self-attention: score query chunk i only
                                    # against keys up to its end ((n+1)/2n of the work)
  fused_qkv: bool = True            # self-attention's q, k, v as one product (same params)
  scan_layers: bool = True          # nn.scan over layers (params get a leading LAYERS axis)
  num_encoder_layers: int | None = None  # encoder_decoder only; None = num_layers
  num_token_types: int = 0          # BERT segment (token-type) embeddings; 0 = none
  mlm_head: bool = False            # BERT's dense + activation + norm before the logits
  logits_bias: bool = False         # a learned bias [V] added to the logits (BERT)
  num_classes: int = 0              # C of the pooled classification head (`classify`)

  def __post_init__(self):
    _check_choice("arch", self.arch, ARCHS)
    _check_choice("position", self.position, POSITIONS)
    _check_choice("norm", self.norm, NORMS)
    _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("remat", self.remat, REMATS)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    for name in ("dtype", "param_dtype", "logits_dtype"):
      _check_choice(name, getattr(self, name), DTYPES)
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_len",
                 "relative_buckets", "relative_max_distance", "causal_chunks",
                 "logits_pad_to"):
      _check_positive(name, getattr(self, name))

    derived = tuple(name for name in _DERIVED if getattr(self, name) is None)
    object.__setattr__(self, "_derived", derived)  # remembered so replace() re-derives
    if self.head_dim is None:
      if self.embed_dim % self.num_heads:
        raise UserError(
            f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
            "change one of them or set head_dim explicitly.")
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.attention_dropout_rate is None:
      object.__setattr__(self, "attention_dropout_rate", self.dropout_rate)
    if self.num_encoder_layers is None:
      object.__setattr__(self, "num_encoder_layers", self.num_layers)
    if self.qkv_bias is None:
      object.__setattr__(self, "qkv_bias", self.use_bias)
    _check_positive("head_dim", self.head_dim)
    _check_positive("num_kv_heads", self.num_kv_heads)
    _check_positive("num_encoder_layers", self.num_encoder_layers)
    if self.num_heads % self.num_kv_heads:
      raise UserError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
          f"{self.num_kv_heads}; pick num_kv_heads dividing num_heads (1 = multi-query).")
    if self.attention_impl == "cudnn" and self.dtype == "float32":
      raise UserError("attention_impl='cudnn' (cuDNN flash attention) needs dtype='bfloat16' "
                      "or 'float16'; use attention_impl='einsum' or 'jax' for float32.")
    _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise UserError(f"rope_scaling='llama3' needs rope_high_freq_factor > "
                      f"rope_low_freq_factor, got {self.rope_high_freq_factor} <= "
                      f"{self.rope_low_freq_factor}; fix the two factors.")
    if self.sliding_window < 0 or isinstance(self.sliding_window, bool):
      raise UserError(f"sliding_window={self.sliding_window!r} must be an integer >= 0 "
                      "(0 = attend to every earlier position); fix sliding_window.")
    if self.position == "rope" and self.head_dim % 2:
      raise UserError(f"position='rope' needs an even head_dim, got {self.head_dim}; "
                      "change head_dim (or embed_dim / num_heads).")
    for name in ("num_token_types", "num_classes"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"TransformerConfig.{name}={value!r} must be an integer >= 0 "
                        f"(0 turns it off); fix {name}.")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise UserError(f"{name}={getattr(self, name)} must be in [0, 1); fix {name}.")

  def replace(self, **changes) -> "TransformerConfig":
    """A copy with `changes`; fields left to their derived default are re-derived."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise UserError(f"TransformerConfig has no field(s) {unknown}; valid fields: "
                      f"{[f.name for f in dataclasses.fields(self)]}.")
    kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    kwargs.update({name: None for name in self._derived})
    kwargs.update(changes)
    return TransformerConfig(**kwargs)

  @property
  def rope(self) -> RopeScaling:
    """The `rope_*` fields as `llmjax.layers.position.RopeScaling`."""
    return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_original_max_len,
                       self.rope_low_freq_factor, self.rope_high_freq_factor,
                       self.rope_beta_fast, self.rope_beta_slow, self.rope_truncate,
                       self.rope_attention_factor)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def output_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.logits_dtype)

  @property
  def gated(self) -> bool:
    """Whether the MLP is gated (two input projections `wi_0`, `wi_1`)."""
    return self.activation in GATED_ACTIVATIONS
