"""Named model sizes as data: `PRESETS[name]` is a `TransformerConfig`.

Parameter counts (checked by tests/models/test_presets.py via `jax.eval_shape`):
  tiny                  decoder-only GPT-style test model          (vocab 128)
  tiny-llama            decoder-only LLaMA-style test model        (vocab 128)
  bert-tiny             encoder-only BERT-style test model         (vocab 128)
  t5-tiny               encoder-decoder T5-style test model        (vocab 128)
  nanogpt-char          nanoGPT's shakespeare_char: 10,770,816 at vocab 65
  gpt2-124m             GPT-2 small:  124,439,808 at vocab 50257
  gpt2-350m             GPT-2 medium: 354,823,168 at vocab 50257
  llama-style-small     124,668,672 at vocab 32000 (12 x 768, GQA 12/4, SwiGLU 2048)

GPT-2 counts include the learned position table and count the tied embedding once.
nanoGPT's printed "10.65M" excludes the position table (256 x 384 = 98,304).
"""

from llmjax.errors import UserError
from llmjax.models.config import TransformerConfig

_GPT2 = {"arch": "decoder_only", "position": "learned", "norm": "layernorm",
         "norm_position": "pre", "norm_eps": 1e-5, "activation": "gelu", "use_bias": True,
         "tie_embeddings": True}
_LLAMA = {"arch": "decoder_only", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
          "norm_eps": 1e-5, "activation": "swiglu", "use_bias": False, "tie_embeddings": False}

PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                              mlp_dim=256, max_len=64, **_GPT2),
    "tiny-llama": TransformerConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp_dim=192, max_len=64, **_LLAMA),
    "bert-tiny": TransformerConfig(
        arch="encoder_only", vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
        mlp_dim=256, max_len=64, position="learned", norm="layernorm", norm_position="post",
        norm_eps=1e-12, final_norm=False, embed_norm=True, activation="gelu_exact",
        use_bias=True, tie_embeddings=True),
    # T5 v1.1's layout: bucketed relative position bias (one table per stack), RMSNorm
    # without bias, gated GELU, untied output layer.
    "t5-tiny": TransformerConfig(
        arch="encoder_decoder", vocab_size=128, embed_dim=64, num_layers=2,
        num_encoder_layers=2, num_heads=4, mlp_dim=128, max_len=64, position="t5_relative",
        norm="rmsnorm", norm_position="pre", norm_eps=1e-6, activation="geglu",
        use_bias=False, tie_embeddings=False),
    "nanogpt-char": TransformerConfig(
        vocab_size=65, embed_dim=384, num_layers=6, num_heads=6, mlp_dim=1536, max_len=256,
        dropout_rate=0.2, **{**_GPT2, "activation": "gelu_exact"}),  # nanoGPT: nn.GELU()
    "gpt2-124m": TransformerConfig(vocab_size=50257, embed_dim=768, num_layers=12,
                                   num_heads=12, mlp_dim=3072, max_len=1024, **_GPT2),
    "gpt2-350m": TransformerConfig(vocab_size=50257, embed_dim=1024, num_layers=24,
                                   num_heads=16, mlp_dim=4096, max_len=1024, **_GPT2),
    "llama-style-small": TransformerConfig(
        vocab_size=32000, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=4,
        mlp_dim=2048, max_len=2048, **_LLAMA),
}


def get_preset(name: str, **overrides) -> TransformerConfig:
  """The preset `name`, with `overrides` applied (derived fields re-derived)."""
  if name not in PRESETS:
    raise UserError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
