"""Chat templates: a conversation -> the (`prompt`, `response`) strings SFT trains on.

A chat template is a Jinja program over `messages` (a list of `{role, content}`), the
convention of Hugging Face's `tokenizer_config.json` (`chat_template`), rendered in
Jinja's sandbox (`ImmutableSandboxedEnvironment`, as transformers does: a template
from a downloaded model can read its arguments and nothing else). The repo's default
template needs no special tokens, so any tokenizer trained here can read it:

  ### User:                  <- a 'system' message, if any, comes first, then a blank line
  Who speaks this line?
                             <- blank line between turns
  ### Assistant:
  IAGO                       <- the response; EOS is the objective's (an id, not text)

The split into prompt and response is the one TRL's chat SFT uses: the prompt is the
conversation up to the last assistant turn rendered with `add_generation_prompt=True`
(what inference would feed), the response is whatever the full conversation adds after
it. That needs the rendering of the prefix to be a prefix of the full rendering, which
every sane template satisfies; `render` checks it. Earlier assistant turns stay in the
prompt (trained on as context, not as targets). `bos_token` and `eos_token` render as
empty strings: the objective adds BOS and EOS as ids, because their text ('</s>')
would be encoded as ordinary characters by a SentencePiece model.
"""

import json
import pathlib
from collections.abc import Mapping, Sequence

from llmjax.errors import UserError

DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### User:\\n' }}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' }}{{ message['content'] }}{{ eos_token }}"
    "{%- if not loop.last %}{{ '\\n\\n' }}{% endif -%}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif -%}")
ROLES = ("system", "user", "assistant")
# Files in a data folder (or a workdir) that carry a template, most specific first.
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json",
                  "hf_tokenizer/tokenizer_config.json")


def _raise(message):
  raise UserError(f"the chat template refused the conversation: {message}; fix the "
                  "record's roles or use a template that accepts them")


def compile_template(source: str):
  """A Jinja template in the sandbox, with HF's `raise_exception` helper."""
  from jinja2 import TemplateError  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = _raise
  try:
    return env.from_string(source)
  except TemplateError as e:
    raise UserError(f"the chat template does not parse ({e}): fix its Jinja syntax, or "
                    "leave chat_template unset for the default template") from e


def _from_tokenizer_config(path: pathlib.Path) -> str:
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read {path} as JSON ({e}): pass a Hugging Face "
                    "tokenizer_config.json or a .jinja file") from None
  template = config.get("chat_template") if isinstance(config, dict) else None
  if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if not isinstance(template, str) or not template:
    raise UserError(f"{path} has no 'chat_template' string: the model has no chat format; "
                    "leave chat_template unset to use the default template")
  return template


def load_template(path: str | None) -> str:
  """The template source at `path`: a `.jinja` file, a `tokenizer_config.json`, or a folder
  holding one of `TEMPLATE_FILES` (a data folder; an imported workdir's `hf_tokenizer/`).
  None, or a folder holding none of them: the default template."""
  if path is None:
    return DEFAULT_TEMPLATE
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    found = [p / name for name in TEMPLATE_FILES if (p / name).is_file()]
    if not found:
      return DEFAULT_TEMPLATE
    p = found[0]
  if not p.is_file():
    raise UserError(f"chat template {path} does not exist: pass a .jinja file, a "
                    "tokenizer_config.json or a folder holding one")
  if p.suffix == ".json":
    return _from_tokenizer_config(p)
  return p.read_text(encoding="utf-8")


def check_messages(messages, where: str) -> list[dict[str, str]]:
  """`messages` as `[{'role', 'content'}]` ending in an assistant turn, or a UserError
  that names `where` (e.g. 'data.jsonl:12')."""
  shape = ('{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
           '"content": "..."}]}')
  if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
    raise UserError(f"{where}: 'messages' must be a non-empty list; write {shape}")
  out = []
  for i, m in enumerate(messages):
    if (not isinstance(m, Mapping) or m.get("role") not in ROLES
        or not isinstance(m.get("content"), str)):
      raise UserError(f"{where}: message {i} is {m!r}; each message needs a role (one of "
                      f"{', '.join(ROLES)}) and a string content, as in {shape}")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "assistant":
    raise UserError(f"{where}: the conversation ends with a {out[-1]['role']!r} turn, so "
                    "there is no response to train on: end it with an assistant message")
  return out


def render(messages: Sequence[Mapping[str, str]], template=None) -> tuple[str, str]:
  """(prompt, response) of a conversation ending in an assistant turn (module doc).

  template: a compiled template (`compile_template`), or None for the default.
  """
  from jinja2 import TemplateError  # pylint: disable=import-outside-toplevel
  template = template or compile_template(DEFAULT_TEMPLATE)
  messages = [dict(m) for m in messages]
  kwargs = {"bos_token": "", "eos_token": ""}
  try:
    prompt = template.render(messages=messages[:-1], add_generation_prompt=True, **kwargs)
    full = template.render(messages=messages, add_generation_prompt=False, **kwargs)
  except TemplateError as e:  # the sandbox's SecurityError included
    raise UserError(f"the chat template failed on a conversation ({type(e).__name__}: {e}):"
                    " fix the template, or leave it unset for the default one") from e
  if not full.startswith(prompt):
    raise UserError("the chat template renders the conversation without its last turn "
                    f"({prompt[-80:]!r}) as something that is not a prefix of the whole "
                    f"conversation ({full[:len(prompt)][-80:]!r}), so the prompt/response "
                    "boundary is undefined: use a template whose generation prompt "
                    "matches the start of an assistant turn")
  return prompt, full[len(prompt):]
