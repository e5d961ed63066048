"""A plain PyTorch GPT in the style of nanoGPT's `model.py`: the reference peer.

Written for these benchmarks (not copied): the same network as llmjax's GPT-2-style
decoder (pre-LayerNorm, learned positions, exact GELU, biases, tied embeddings,
residual projections initialised with std 0.02 / sqrt(2 * n_layer)), so parameter counts
match `llmjax.models.presets` exactly. Attention goes through
`F.scaled_dot_product_attention(is_causal=True)`, as nanoGPT's "flash" path does.
"""

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass
class GPTConfig:
  vocab_size: int = 65
  block_size: int = 256
  n_layer: int = 6
  n_head: int = 6
  n_embd: int = 384
  dropout: float = 0.0


class CausalSelfAttention(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
    self.c_proj = nn.Linear(config.n_embd, config.n_embd)
    self.n_head, self.dropout = config.n_head, config.dropout

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.c_attn(x).split(c, dim=2)
    # [B, T, C] -> [B, nh, T, hs]
    q, k, v = (a.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for a in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                       dropout_p=self.dropout if self.training else 0.0)
    y = y.transpose(1, 2).contiguous().view(b, t, c)
    return self.c_proj(y)


class MLP(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
    self.gelu = nn.GELU()
    self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, x):
    return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.ln_1 = nn.LayerNorm(config.n_embd)
    self.attn = CausalSelfAttention(config)
    self.ln_2 = nn.LayerNorm(config.n_embd)
    self.mlp = MLP(config)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.config = config
    self.wte = nn.Embedding(config.vocab_size, config.n_embd)
    self.wpe = nn.Embedding(config.block_size, config.n_embd)
    self.drop = nn.Dropout(config.dropout)
    self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
    self.ln_f = nn.LayerNorm(config.n_embd)
    self.apply(self._init_weights)
    for name, p in self.named_parameters():
      if name.endswith("c_proj.weight"):  # GPT-2's scaled residual projections
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

  @staticmethod
  def _init_weights(module):
    if isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, mean=0.0, std=0.02)
      nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, mean=0.0, std=0.02)

  def num_params(self) -> int:
    return sum(p.numel() for p in self.parameters())

  def forward(self, idx, targets=None):
    """Logits `[B, T, V]`, and the mean cross-entropy against `targets` if given."""
    t = idx.shape[1]
    pos = torch.arange(t, dtype=torch.long, device=idx.device)
    x = self.drop(self.wte(idx) + self.wpe(pos))
    for block in self.h:
      x = block(x)
    logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output projection
    if targets is None:
      return logits, None
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
    return logits, loss


def adamw(model: nn.Module, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.1,
          fused: bool = False):
  """AdamW with decay on matrices only (not biases, norms or embedding tables).

  The same parameter split as `llmjax.optim.optimizers.DEFAULT_NO_DECAY`. `fused`: one
  CUDA kernel for the whole update (nanoGPT uses it on GPUs).
  """
  tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
  decay, no_decay = [], []
  for p in model.parameters():  # tied weights appear once
    (no_decay if id(p) in tables or p.dim() < 2 else decay).append(p)
  groups = [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
