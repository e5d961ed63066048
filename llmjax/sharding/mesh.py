"""The device mesh: axes ('data', 'fsdp', 'tensor') over all global devices.

One CPU is a 1x1x1 mesh; a pod slice is the same code with bigger numbers. Axis types are
Auto because flax linen's logical constraints need them (`jax.make_mesh` defaults to
Explicit in recent jax).
"""

import math

import jax
from jax.sharding import AxisType

from llmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1):
  """Fills in the one axis given as -1 so that the product equals `num_devices`."""
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise UserError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                    f"tensor={tensor}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise UserError(f"cannot split {num_devices} devices into a mesh with fsdp={fsdp} "
                      f"tensor={tensor} data={data}; choose sizes that divide {num_devices}.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs "
                    f"{math.prod(shape)} devices but {num_devices} are available; set one "
                    "axis to -1 to take the rest.")
  return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(len(devices), data, fsdp, tensor)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
