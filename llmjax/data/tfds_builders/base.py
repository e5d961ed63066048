"""The base of llmjax's own TFDS builders."""

import sys

import tensorflow_datasets as tfds
from etils import epath


class OwnBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A `GeneratorBasedBuilder` defined inside the llmjax package (not registered itself)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds it via `importlib_resources` (absent on Python >= 3.9) for
    # builders defined in a package; the subclass's module file is the answer it would
    # compute.
    return epath.Path(sys.modules[cls.__module__].__file__)
