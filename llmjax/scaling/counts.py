"""Parameter and FLOP counts (Kaplan et al. 2020, §2.1; PaLM appendix B for attention).

Training FLOPs per token ≈ 6N (forward + backward through the weights) plus
12·L·D·T for attention scores and values (L layers, D width, T context). Causal
attention only needs half of that, which efficient kernels exploit; both are reported.
"""

import math

import jax


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def train_flops_per_token(num_params: int, num_layers: int, embed_dim: int, seq_len: int,
                          *, causal_halved: bool = False) -> float:
  attention = 12 * num_layers * embed_dim * seq_len
  return 6 * num_params + (attention / 2 if causal_halved else attention)
