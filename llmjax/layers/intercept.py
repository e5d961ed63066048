"""Change how the network's dense layers compute, from outside the model.

Every product with a weight goes through an `Einsum` (q, k, v, o, the MLP, the untied
head, BERT's and the classifier's dense layers) or the `Embed` table (lookup and tied
logits), fused q/k/v included (`Attention._fused_qkv` still calls each layer). So LoRA,
adapters, fake quantization or an int8 kernel need no edit of the model: they intercept
those calls, selected by module path (gemma's `peft/_interceptors.py` pattern, built on
flax's `nn.intercept_methods`):

  def lora(call):                     # y = W x + B A x on every attention projection
    y = call.proceed()
    ...
    return y + delta

  with intercept.intercept(lora, path="*/attention/*"):
    logits = model.apply({"params": params}, tokens)

The context must be active while jax traces the model, so under `jit` enter it inside
the jitted function (`intercepted` wraps a function in it). Paths are the '/'-joined
module names of the parameter tree: 'decoder/layers/attention/query' (scanned layers),
'decoder/layers_0/mlp/wi' (unscanned), 'lm_head', 'embed'. An interceptor on
`Einsum.__call__` or `Embed.__call__` may create parameters of its own beside the
kernel / table with `call.module.param(...)` (those methods are `nn.compact` for this).
"""

import contextlib
import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from llmjax.layers.embed import Embed
from llmjax.layers.linear import Einsum

PRODUCTS = ("__call__", "attend")  # the methods that compute: Einsum's product, Embed's two


@dataclasses.dataclass(frozen=True)
class Call:
  """One intercepted call: `proceed()` runs the layer's own method (and any interceptors
  inside this one) on the original arguments, or on the ones given."""

  module: nn.Module          # the bound Einsum / Embed
  method: str                # '__call__', 'attend' or 'weights'
  path: str                  # e.g. 'decoder/layers/attention/query'
  args: tuple
  kwargs: dict
  _next: Callable

  def proceed(self, *args, **kwargs):
    if not args and not kwargs:
      args, kwargs = self.args, self.kwargs
    return self._next(*args, **kwargs)


def module_path(module: nn.Module) -> str:
  """'/'-joined names of a bound module, as in the parameter tree."""
  return "/".join(str(p) for p in module.path)


def _matcher(path) -> Callable[[str], bool]:
  if callable(path):
    return path
  if isinstance(path, re.Pattern):
    return lambda p: path.search(p) is not None
  return lambda p: fnmatch.fnmatchcase(p, path)


@contextlib.contextmanager
def intercept(fn: Callable[[Call], Any], *, path="*", layers=(Einsum, Embed),
              methods=PRODUCTS):
  """Routes calls of `methods` on `layers` whose path matches `path` through `fn(call)`.

  Args:
    fn: returns what the method would; `call.proceed()` runs the original.
    path: a glob over module paths ('*/attention/*', 'lm_head'), a compiled regex
      (searched), or a predicate on the path string.
    layers: the module classes to intercept.
    methods: method names; add 'weights' to change the parameters an `Einsum` uses
      (fused q/k/v builds its product from them).
  """
  matches = _matcher(path)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers) and context.method_name in methods
        and matches(module_path(module))):
      return fn(Call(module, context.method_name, module_path(module), args, kwargs,
                     next_fun))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def intercepted(f: Callable, fn: Callable[[Call], Any], **selection) -> Callable:
  """`f` run inside `intercept(fn, **selection)`: for functions jax traces (jit, grad)."""

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    with intercept(fn, **selection):
      return f(*args, **kwargs)

  return wrapper
