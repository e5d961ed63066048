"""Reading and writing Hugging Face model folders: `config.json` + safetensors.

Safetensors (https://github.com/huggingface/safetensors) is an 8-byte little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets}}` and the raw bytes. It is read
and written here with numpy alone (bfloat16 via ml_dtypes), so conversion needs neither
torch nor the `safetensors` package. Sharded checkpoints have `model.safetensors.index.json`
(`weight_map: name -> file`). Pickle-based `pytorch_model.bin` files are never loaded:
unpickling runs arbitrary code.
"""

import json
import os
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np

from llmjax.errors import UserError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (copies, little-endian)."""
  with open(path, "rb") as f:
    data = f.read()
  (header_len,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + header_len])
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which llmjax cannot "
                      f"read; convert the checkpoint to one of {sorted(_DTYPES)}.")
    start, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
    out[name] = np.frombuffer(data[base + start:base + end], dtype).reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` (sorted by name) to one .safetensors file."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  header["__metadata__"] = {"format": "pt"}  # what transformers' loader expects
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for blob in blobs:
      f.write(blob)


def read_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {tensor name: array}) of a Hugging Face model folder."""
  return read_config(path), read_tensors(path)


def read_config(path: str) -> dict:
  """config.json of a Hugging Face model folder as a dict."""
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise UserError(f"{path} has no config.json; pass the folder that `save_pretrained` "
                    "wrote (config.json next to the *.safetensors files).")
  with open(config_path, encoding="utf-8") as f:
    return json.load(f)


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's safetensors files (sharded or not); never pickle."""
  if os.path.isfile(os.path.join(path, INDEX)):
    with open(os.path.join(path, INDEX), encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(path, SINGLE)):
    files = [SINGLE]
  else:
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
      pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      raise UserError(
          f"{path} has no *.safetensors weights"
          + (f" (only pickle-based {pickled}, which llmjax never loads: unpickling runs "
             "arbitrary code)" if pickled else "")
          + "; re-save the model with `model.save_pretrained(dir, safe_serialization=True)` "
          "or download its safetensors files.")
    files = found
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(path, name)))
  return tensors


def write_hf_dir(path: str, config: dict, tensors: dict[str, np.ndarray],
                 max_shard_bytes: int | None = None, extra_files: dict[str, bytes] | None = None):
  """Writes a Hugging Face folder atomically (a temp folder renamed into place).

  With `max_shard_bytes`, tensors are split over `model-0000i-of-0000n.safetensors` plus
  an index; otherwise one `model.safetensors`. `extra_files` (name -> bytes) are copied in
  (tokenizer files). An existing folder is replaced only once the new one is complete.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".tmp")
  try:
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
      write_safetensors(os.path.join(tmp, SINGLE), tensors)
    else:
      weight_map = {}
      for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(tmp, fname), {n: tensors[n] for n in names})
        weight_map.update({n: fname for n in names})
      total = sum(int(np.asarray(t).nbytes) for t in tensors.values())
      with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for name, data in (extra_files or {}).items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _plan_shards(tensors, max_shard_bytes):
  if not max_shard_bytes:
    return [sorted(tensors)]
  shards, current, size = [], [], 0
  for name in sorted(tensors):
    nbytes = int(np.asarray(tensors[name]).nbytes)
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  return shards + [current] if current else shards
