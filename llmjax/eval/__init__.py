"""Evaluation: translation quality (BLEU / chrF through sacrebleu, `bleu.py`)."""
