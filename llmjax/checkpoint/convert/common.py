"""Helpers shared by the per-architecture converters: tensor lookup, layouts, checks.

Conventions: Hugging Face `nn.Linear` weights are `[out, in]` (llmjax kernels are
`[in, out]`, so they are transposed); GPT-2's `Conv1D` weights are already `[in, out]`.
Attention kernels are split into heads: query `[D, N*H] -> [D, N, H]` (HF's `view(..., N,
H)` is head-major, the same order), out `[N*H, D] -> [N, H, D]`.
"""

import numpy as np

from llmjax.errors import UserError


class Tensors:
  """A name -> array dict that reports missing names and remembers which were used."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self._tensors = tensors
    self._source = source
    self.used = set()

  def __contains__(self, name):
    return name in self._tensors

  def __call__(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise UserError(f"{self._source} has no tensor {name!r} that its config.json implies; "
                      "the checkpoint is incomplete or of another architecture (check "
                      "model_type in config.json).")
    self.used.add(name)
    return np.asarray(self._tensors[name])

  def unused(self) -> list[str]:
    return sorted(set(self._tensors) - self.used)


def linear(weight: np.ndarray) -> np.ndarray:
  """HF `nn.Linear.weight [out, in]` -> llmjax kernel `[in, out]`."""
  return np.ascontiguousarray(weight.T)


def split_heads_in(kernel: np.ndarray, heads: int) -> np.ndarray:
  """`[D, N*H]` -> `[D, N, H]` (query/key/value kernels)."""
  return kernel.reshape(kernel.shape[0], heads, -1)


def split_heads_out(kernel: np.ndarray, heads: int) -> np.ndarray:
  """`[N*H, D]` -> `[N, H, D]` (the attention output kernel)."""
  return kernel.reshape(heads, -1, kernel.shape[-1])


def merge_heads_in(kernel: np.ndarray) -> np.ndarray:
  """`[D, N, H] -> [D, N*H]` (inverse of `split_heads_in`)."""
  return kernel.reshape(kernel.shape[0], -1)


def merge_heads_out(kernel: np.ndarray) -> np.ndarray:
  """`[N, H, D] -> [N*H, D]` (inverse of `split_heads_out`)."""
  return kernel.reshape(-1, kernel.shape[-1])


def unsupported(model_type: str, option: str, value, fix: str) -> UserError:
  return UserError(f"{model_type} checkpoints with {option}={value!r} are not supported by "
                   f"llmjax's converter; {fix}")
