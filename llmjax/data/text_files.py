"""Reading user text files: one strict UTF-8 decoder with an error that says where."""

from llmjax.errors import UserError


def decode_utf8(data: bytes, path, offset: int = 0) -> str:
  """Decodes `data` (read from `path`, starting at byte `offset` of the file) as UTF-8."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                    f"{offset + e.start} cannot be decoded. Convert the file (e.g. `iconv -f "
                    "latin1 -t utf-8`) or remove it from the input") from None
