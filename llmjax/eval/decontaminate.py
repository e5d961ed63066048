"""Decontamination: which evaluation examples share a 13-gram with the training data.

The GPT-3 paper's test (Brown et al. 2020, appendix C): an example is contaminated when
any run of 13 consecutive words (lowercased `\\w+` words) also occurs in the training
split; an example shorter than 13 words is contaminated when all of it occurs there as a
contiguous run. Word n-grams are hashed as the near-duplicate filter hashes its shingles
(`llmjax.data.dedup.shingle_hashes`: 64-bit, so a false match is ~n^2 / 2^64).
"""

import re

import numpy as np

from llmjax.data import dedup

NGRAM = 13
_WORDS = re.compile(r"\w+")


def overlaps(eval_texts, train_texts, n: int = NGRAM) -> np.ndarray:
  """A bool per evaluation text: does it share an n-gram (or all of itself, if shorter)
  with any training text?"""
  eval_texts, train_texts = list(eval_texts), list(train_texts)
  sizes = np.asarray([min(len(_WORDS.findall(t.lower())), n) for t in eval_texts])
  flags = np.zeros(len(eval_texts), bool)
  for k in sorted(set(sizes.tolist()) - {0}):
    train = np.unique(dedup.shingle_hashes(train_texts, k)[0])
    index = np.flatnonzero(sizes == k)
    hashes, docs = dedup.shingle_hashes([eval_texts[i] for i in index], k)
    flags[index[np.unique(docs[np.isin(hashes, train)])]] = True
  return flags
