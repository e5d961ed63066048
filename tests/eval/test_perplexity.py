"""Perplexity: the sliding windows' coverage, float64 reference loops for all three
architectures, the analytic uniform model, batching, and parity with transformers' perplexity
computed the documented way."""

import math

import jax
import numpy as np
import pytest

from llmjax.data import tokenizer as tokenizer_lib
from llmjax.eval import perplexity as ppl
from llmjax.testing.reference import preset_model


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("n,context,stride", [(40, 12, 5), (40, 12, 12), (7, 12, 4),
                                              (25, 8, 1), (2, 4, 2)])
def test_windows_score_each_token_once_with_its_promised_context(n, context, stride):
  scored = []
  for begin, end, first in ppl.windows(n, context, stride):
    assert end - begin <= context and begin < first <= end
    for i in range(first, end):
      scored.append(i)
      if begin > 0:  # past the first window: at least context - stride tokens before i
        assert i - begin >= context - stride
  assert len(scored) == len(set(scored))
  if stride < context:
    assert sorted(scored) == list(range(1, n))
  else:  # disjoint windows: every window's first token goes unpredicted (as in the HF guide)
    starts = [b for b, _, _ in ppl.windows(n, context, stride)]
    assert sorted(scored) == [i for i in range(1, n) if i not in starts]


def _reference_causal(model, params, doc, context, stride):
  """Token by token: token i is scored by the first window reaching it, from that window's
  begin; the model runs on exactly the prefix it may see; float64 softmax."""
  total, count, apply = 0.0, 0, jax.jit(model.apply)
  for i in range(1, len(doc)):
    k = max(0, math.ceil((i + 1 - context) / stride))
    begin = k * stride
    if i == begin:
      continue  # a window's own first token (stride == context)
    logits = apply({"params": params}, np.asarray([doc[begin:i]], np.int32))
    total -= _log_softmax64(logits[0, -1])[doc[i]]
    count += 1
  return total, count


@pytest.mark.parametrize("stride", [3, 8])
def test_causal_sums_equal_a_float64_token_by_token_loop(stride):
  model, params = preset_model("tiny", max_len=8)
  rng = np.random.default_rng(0)
  docs = [rng.integers(5, 128, n).tolist() for n in (19, 5)]
  sums = ppl.causal_sums(model, params, docs, context=8, stride=stride, batch_size=4)
  ref = [_reference_causal(model, params, d, 8, stride) for d in docs]
  assert sums.tokens == sum(c for _, c in ref)
  assert sums.nll == pytest.approx(sum(t for t, _ in ref), rel=1e-5)
  # batch size and document order change nothing
  again = ppl.causal_sums(model, params, docs[::-1], context=8, stride=stride, batch_size=1)
  assert again.nll == pytest.approx(sums.nll, rel=1e-6) and again.tokens == sums.tokens


def test_a_uniform_model_has_perplexity_v_and_its_bits_per_byte(tmp_path):
  tok = tokenizer_lib.train_tokenizer(["abc def ghi " * 20, "to be or not to be " * 20],
                                      str(tmp_path / "spm"), model_type="char",
                                      vocab_size=None)
  model, params = preset_model("tiny", vocab_size=tok.vocab_size, max_len=16)
  zeros = jax.tree.map(np.zeros_like, params)  # zero logits: the uniform distribution
  texts = ["to be or not to be, that is", "abc", "ghi def abc def ghi def"]
  m = ppl.text_perplexity(model, zeros, tok, texts, context=16, stride=8)
  assert m["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)
  n_tokens = sum(len(tok.encode(t)) for t in texts)
  assert m["tokens"] == n_tokens  # the prefix makes every text token scored
  n_bytes = sum(len(t.encode()) for t in texts)
  assert m["bits_per_byte"] == pytest.approx(math.log2(tok.vocab_size) * n_tokens / n_bytes,
                                             rel=1e-6)


def test_pseudo_perplexity_equals_masking_one_token_at_a_time():
  model, params = preset_model("bert-tiny", max_len=8)
  rng = np.random.default_rng(1)
  docs = [[2, *rng.integers(5, 128, n).tolist(), 1] for n in (4, 9)]
  sums = ppl.masked_sums(model, params, docs, mask_id=4, context=8, batch_size=3,
                         skip_ids=(0, 1, 2))
  total, count, apply = 0.0, 0, jax.jit(model.apply)
  for doc in docs:
    for start in range(0, len(doc), 8):
      chunk = doc[start:start + 8]
      for i, t in enumerate(chunk):
        if t in (0, 1, 2):
          continue
        masked = np.asarray([chunk[:i] + [4] + chunk[i + 1:]], np.int32)
        logits = apply({"params": params}, masked, np.ones_like(masked))
        total -= _log_softmax64(logits[0, i])[t]
        count += 1
  assert sums.tokens == count and sums.nll == pytest.approx(total, rel=1e-5)


def test_target_perplexity_equals_one_pair_at_a_time():
  model, params = preset_model("t5-tiny")
  rng = np.random.default_rng(2)
  pairs = [(rng.integers(5, 128, a).tolist() + [1], rng.integers(5, 128, b).tolist() + [1])
           for a, b in ((6, 3), (3, 7), (9, 1))]
  sums = ppl.target_sums(model, params, pairs, start_id=2, batch_size=2)
  total, apply = 0.0, jax.jit(model.apply)
  for inp, tgt in pairs:
    logits = apply({"params": params}, np.asarray([[2, *tgt[:-1]]], np.int32),
                         encoder_tokens=np.asarray([inp], np.int32))
    lp = _log_softmax64(logits[0])
    total -= sum(lp[j, t] for j, t in enumerate(tgt))
  assert sums.tokens == sum(len(t) for _, t in pairs)
  assert sums.nll == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("stride", [4, 12])
def test_equals_transformers_perplexity_computed_the_documented_way(tmp_path, stride):
  torch = pytest.importorskip("torch")
  from llmjax.checkpoint import convert
  from llmjax.models.transformer import Transformer
  from llmjax.testing import hf_models

  hf = hf_models.randomize(hf_models.hf_model("gpt2"))
  hf.save_pretrained(tmp_path / "hf")
  cfg, params, _ = convert.import_hf(str(tmp_path / "hf"))
  ids = np.random.default_rng(3).integers(3, hf_models.V, 50)
  # The Hugging Face guide's loop, with the sums kept (nll x targets, not a mean of means).
  context, nll_sum, n_scored, prev_end = 12, 0.0, 0, 0
  input_ids = torch.tensor(ids[None], dtype=torch.long)
  for begin in range(0, len(ids), stride):
    end = min(begin + context, len(ids))
    trg_len = end - prev_end
    window = input_ids[:, begin:end]
    target = window.clone()
    target[:, :-trg_len] = -100
    with torch.no_grad():
      loss = hf(window, labels=target).loss
    valid = int((target[:, 1:] != -100).sum())
    nll_sum += float(loss) * valid
    n_scored += valid
    prev_end = end
    if end == len(ids):
      break
  sums = ppl.causal_sums(Transformer(cfg), params, [ids.tolist()], context=context,
                         stride=stride)
  assert sums.tokens == n_scored
  assert sums.nll / sums.tokens == pytest.approx(nll_sum / n_scored, rel=1e-4)
