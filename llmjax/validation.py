"""Type checks for config dataclasses, so a gin binding of the wrong type fails at start-up
with the field's name instead of deep inside a jitted function."""

import dataclasses
import types
import typing

from llmjax.errors import UserError

_SIMPLE = (bool, int, float, str)


def _accepts(hint, value) -> bool:
  if hint is typing.Any or isinstance(hint, typing.TypeVar):
    return True
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_accepts(h, value) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is float:  # ints are fine where floats are wanted; bools are not
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint in _SIMPLE:
    return isinstance(value, hint)
  if origin is tuple:
    return isinstance(value, (tuple, list))
  if origin in (dict, typing.Mapping) or hint in (dict, typing.Mapping):
    return isinstance(value, typing.Mapping)
  return True  # anything richer (objects, callables) is the consumer's to check


def check_types(config) -> None:
  """Raises UserError naming the first field whose value does not match its annotation."""
  if not dataclasses.is_dataclass(config):
    return
  cls = type(config)
  while cls.__module__.startswith("gin"):  # gin may wrap configurable classes
    cls = cls.__mro__[1]
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    hint = hints.get(field.name)
    if hint is not None and not _accepts(hint, value):
      name = cls.__name__
      raise UserError(f"{name}.{field.name}={value!r} has type {type(value).__name__}, but "
                      f"{name}.{field.name} expects {hint}; fix the binding (gin strings "
                      "need quotes, numbers must not have them).")
