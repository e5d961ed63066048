"""The jit-compiled generation loop: greedy equals repeated argmax of the full forward,
per-row EOS, seeded sampling, streaming, stop strings, encoder-decoder."""

import functools
import re

import jax
import numpy as np
import pytest

from llmjax.decode import generate as gen
from llmjax.decode.sampling import SamplingConfig
from llmjax.errors import UserError
from llmjax.testing import reference

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [[5, 17, 99, 3, 42], [7, 8]]
NEW = 6


@functools.cache
def _model(name):
  return reference.preset_model(name, std=0.5)


def _naive_greedy(model, params, prompt, steps, **kw):
  """Argmax of the full forward pass, one token at a time (a fixed buffer: one compile)."""
  forward = jax.jit(functools.partial(model.apply, {"params": params}, **kw))
  buf = np.zeros((1, len(prompt) + steps), np.int32)
  buf[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + steps):
    buf[0, i] = int(np.argmax(np.asarray(forward(buf))[0, i - 1]))
  return list(buf[0, len(prompt):])


@functools.cache
def _greedy(name):
  model, params = _model(name)
  return gen.generate(model, params, PROMPTS, max_new_tokens=NEW, sampling=GREEDY)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_greedy_equals_repeated_argmax_of_full_forward(name):
  model, params = _model(name)
  out = _greedy(name)
  assert out.tokens.shape == (2, NEW) and list(out.lengths) == [NEW, NEW]
  for row, prompt in enumerate(PROMPTS):
    assert list(out.tokens[row]) == _naive_greedy(model, params, prompt, NEW)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_one_row_greedy_equals_repeated_argmax_of_full_forward(name):
  """Batch 1: every step's products are row-vector products (`row_vector_product`)."""
  model, params = _model(name)
  out = gen.generate(model, params, PROMPTS[:1], max_new_tokens=NEW, sampling=GREEDY)
  assert list(out.tokens[0]) == _naive_greedy(model, params, PROMPTS[0], NEW)


def _loop_bodies(hlo: str) -> list[str]:
  """The while-loop bodies' computations in a compiled module's text."""
  names = re.findall(r"body=%([\w.-]+)", hlo)
  return [c for c in hlo.split("\n\n") if any(c.lstrip().startswith(f"%{b} ") for b in names)]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_one_row_decoding_transposes_the_kernels_once_before_the_loop(name):
  """At batch 1 the loop body runs no weight product as a plain `dot` (only the batched
  attention products over the cache remain) and makes no kernel-sized array on any step:
  the output-major kernels (with their bias column) are built once, before the loop."""
  model, params = _model(name)
  tokens, valid, positions = gen.cache_lib.left_pad(PROMPTS[:1])
  hlo = gen._generate.lower(model, params, tokens, valid, positions, jax.random.key(0), -1, 0,
                            0, sampling=GREEDY, max_new_tokens=NEW, listen=False)
  hlo = hlo.compile().as_text()
  cfg = model.config
  d, f = cfg.embed_dim, cfg.mlp_dim
  assert f"f32[{f},{d + 1}]" in hlo                   # an MLP input kernel, [F, D + 1]
  bodies = _loop_bodies(hlo)
  dots = [line for c in bodies for line in c.splitlines() if " dot(" in line]
  assert bodies and dots and all("lhs_batch_dims" in line for line in dots), dots
  made = []
  for line in (line for c in bodies for line in c.splitlines()):
    shape = re.search(r"= f32\[([\d,]+)\]\S* (\S+)\(", line)
    if (shape and shape.group(2) not in ("get-tuple-element", "parameter", "bitcast", "tuple")
        and np.prod([int(n) for n in shape.group(1).split(",")]) >= d * d):
      made.append(line.strip()[:120])
  assert not made, made


def test_rows_stop_independently_at_eos():
  model, params = _model("tiny")
  free = _greedy("tiny").tokens
  eos = int(free[0, 2])                        # row 0 produces it at step 2
  out = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, sampling=GREEDY, eos_id=eos,
                     pad_id=0)
  assert out.lengths[0] == 3 and list(out.tokens[0]) == list(free[0, :3]) + [0] * (NEW - 3)
  stop1 = list(free[1]).index(eos) + 1 if eos in free[1] else NEW
  assert out.lengths[1] == stop1 and list(out.tokens[1, :stop1]) == list(free[1, :stop1])


def test_fixed_seed_sampling_is_reproducible():
  model, params = _model("tiny")
  cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
  run = lambda seed: gen.generate(model, params, PROMPTS, max_new_tokens=NEW, sampling=cfg,
                                  seed=seed).tokens
  a, b, c = run(1), run(1), run(2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_streaming_and_stop_strings():
  model, params = _model("tiny")
  free = _greedy("tiny").tokens
  detok = lambda ids: "".join(f"<{i}>" for i in ids)
  streamed = []
  out = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, sampling=GREEDY,
                     detokenize=detok, stop_strings=[f"<{free[1, 1]}>"],
                     on_tokens=lambda t, active: streamed.append((t.copy(), active.copy())))
  assert out.lengths[1] == 2 and out.texts[1] == f"<{free[1, 0]}>"
  np.testing.assert_array_equal(np.stack([t for t, _ in streamed])[:, 0], free[0, :len(streamed)])
  assert [a[1] for _, a in streamed[:3]] == [True, True, False]


def test_one_character_stop_strings_stop_on_the_device_as_on_the_host():
  """A one-character stop string becomes a token mask checked in the loop (no callback);
  rows stop and their texts are cut exactly where the host's check (forced by streaming)
  stops them."""
  model, params = _model("tiny")
  free = _greedy("tiny").tokens
  newline = int(free[1, 1])      # the token that writes the stop character
  detok = lambda ids: "".join("x\n" if i == newline else f"<{i}>" for i in ids)
  mask, rest = gen.device_stops(("\n", "ab"), detok, model.config.vocab_size)
  assert rest == ("ab",) and np.flatnonzero(mask).tolist() == [newline]
  run = lambda **kw: gen.generate(model, params, PROMPTS, max_new_tokens=NEW, sampling=GREEDY,
                                  detokenize=detok, stop_strings=["\n"], **kw)
  device, host = run(), run(on_tokens=lambda t, active: None)
  assert device.lengths[1] == 2 and device.texts[1] == f"<{free[1, 0]}>x"
  np.testing.assert_array_equal(device.lengths, host.lengths)
  np.testing.assert_array_equal(device.tokens, host.tokens)
  assert device.texts == host.texts


def test_encoder_decoder_greedy_equals_full_forward():
  model, params = _model("t5-tiny")
  source = [3, 9, 27, 81, 50]
  out = gen.generate(model, params, None, max_new_tokens=4, sampling=GREEDY,
                     encoder_inputs=[source])
  want = _naive_greedy(model, params, [0], 4, encoder_tokens=np.array([source], np.int32))
  assert list(out.tokens[0]) == want


def test_learned_positions_limit_is_a_user_error():
  model, params = _model("tiny")
  with pytest.raises(UserError, match="max_len"):
    gen.generate(model, params, [[1] * 60], max_new_tokens=10)


def test_decoding_loop_updates_the_cache_in_place():
  """The compiled loop neither copies nor transposes a cache buffer on any step (the
  copies cost more than the step's matmuls on CPU; see llmjax/decode/cache.py)."""
  model, params = _model("tiny")
  tokens, valid, positions = gen.cache_lib.left_pad(PROMPTS)
  hlo = gen._generate.lower(model, params, tokens, valid, positions, jax.random.key(0), -1, 0,
                            0, sampling=GREEDY, max_new_tokens=NEW, listen=False)
  hlo = hlo.compile().as_text()
  cfg, length = model.config, tokens.shape[1] + NEW
  k, h = cfg.num_kv_heads, cfg.head_dim
  cache_shapes = [f"f32[2,{k},{length},{h}]", f"f32[2,{k},{h},{length}]"]
  assert all(s in hlo for s in cache_shapes)          # the layout the check is about
  bodies = _loop_bodies(hlo)
  moved = [line for c in bodies for line in c.splitlines()
           if (" copy(" in line or "transpose(" in line)
           and any(f"= {s}" in line for s in cache_shapes)]
  assert bodies and any("dynamic-update-slice" in c for c in bodies) and not moved, moved


SHARED = [[5, 17, 99, 3, 42, 8, 61], [5, 17, 99, 7], [5, 17, 99, 3, 12, 30], [5, 17, 99, 3, 42]]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=0.0,
                                                             repetition_penalty=1.3)])
def test_shared_prefix_is_prefilled_once_with_the_same_result(name, sampling):
  """The common prefix (3 tokens here) prefilled in one row and copied, the rest after it:
  the same tokens as prefilling every whole prompt, learned positions and RoPE alike,
  the repetition penalty seeing the prefix's tokens too; and each row as greedy alone."""
  model, params = _model(name)
  assert gen.shared_prefix_length(SHARED) == 3
  assert gen.shared_prefix_length([[1, 2], [1, 2]]) == 1    # each keeps one token
  run = lambda share: gen.generate(model, params, SHARED, max_new_tokens=NEW,
                                   sampling=sampling, share_prefix=share, pad_multiple=4)
  shared, whole = run(True), run(False)
  np.testing.assert_array_equal(shared.tokens, whole.tokens)
  if sampling is GREEDY:
    for row, prompt in enumerate(SHARED):
      assert list(shared.tokens[row]) == _naive_greedy(model, params, prompt, NEW)


def test_shared_prefix_is_not_used_where_slots_must_be_positions(monkeypatch):
  """A sliding window reads slot distances, which the padding between prefix and rest
  would stretch: such a model prefills whole prompts."""
  model, params = _model("tiny-llama")
  model = model.clone(config=model.config.replace(sliding_window=3))
  seen = []
  real = gen._generate
  monkeypatch.setattr(gen, "_generate", lambda *a, **k: seen.append(a[12]) or real(*a, **k))
  out = gen.generate(model, params, SHARED, max_new_tokens=NEW, sampling=GREEDY,
                     share_prefix=True)
  assert seen == [None]
  for row, prompt in enumerate(SHARED):
    assert list(out.tokens[row]) == _naive_greedy(model, params, prompt, NEW)


def test_greedy_batches_narrow_to_their_unfinished_rows():
  """8 rows, most stopping at once: the loop gathers the 2 still going into a batch of 2
  and finishes with those. Tokens and lengths equal the unnarrowed loop's (streaming
  keeps every row) and each row's greedy continuation alone."""
  model, params = _model("tiny")
  prompts = [[5 + r, 17, 99 - r, 3][: 2 + r % 3] for r in range(8)]
  free = gen.generate(model, params, prompts, max_new_tokens=NEW, sampling=GREEDY)
  def spared(token):  # the rows that never produce `token`, and the last stop among the rest
    rows = [r for r in range(8) if token not in free.tokens[r]]
    stops = [list(free.tokens[r]).index(token) for r in range(8) if r not in rows]
    return rows, max(stops, default=NEW)
  # an EOS that stops all rows but one or two, early enough for narrow steps to follow
  eos = next(int(t) for t in np.unique(free.tokens)
             if 1 <= len(spared(t)[0]) <= 2 and spared(t)[1] < NEW - 2)
  kept = spared(eos)[0]
  run = lambda **kw: gen.generate(model, params, prompts, max_new_tokens=NEW, sampling=GREEDY,
                                  eos_id=eos, **kw)
  narrow, wide = run(), run(on_tokens=lambda tokens, active: None)
  np.testing.assert_array_equal(narrow.tokens, wide.tokens)
  np.testing.assert_array_equal(narrow.lengths, wide.lengths)
  assert all(narrow.lengths[r] == NEW for r in kept) and min(narrow.lengths) <= 2
  for row in kept:
    assert list(narrow.tokens[row]) == _naive_greedy(model, params, prompts[row], NEW)
  tokens, valid, positions = gen.cache_lib.left_pad(prompts)
  hlo = gen._generate.lower(model, params, tokens, valid, positions, jax.random.key(0), eos,
                            0, 0, sampling=GREEDY, max_new_tokens=NEW, listen=False)
  hlo = hlo.compile().as_text()
  assert len(_loop_bodies(hlo)) == 2                  # the wide loop, then the narrow one
  cfg, length = model.config, tokens.shape[1] + NEW
  k, h = cfg.num_kv_heads, cfg.head_dim
  narrow_cache = [f"f32[2,{k},{length},{h}]", f"f32[2,{k},{h},{length}]"]
  moved = [line for c in _loop_bodies(hlo) for line in c.splitlines()
           if (" copy(" in line or "transpose(" in line) and
           any(f"= {s}" in line for s in narrow_cache + [s.replace("[2,", "[8,")
                                                         for s in narrow_cache])]
  assert not moved, moved                             # both loops update caches in place
