"""The train state: everything a resumed run needs that lives on devices."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: number of updates applied
  params: Any          # unboxed parameter pytree
  opt_state: Any       # optax state, same structure as `params` where it mirrors them
  rng: jax.Array       # uint32 raw key data; each step folds in `step`, so resume is exact
