"""Logical axis names: the vocabulary shared by parameters, activations and rule sets.

Parameters are created with `nn.with_logical_partitioning(init, (EMBED, MLP))` and
activations constrained with `nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))`;
rule sets (`sharding/rules.py`) map these names onto the ('data', 'fsdp', 'tensor') mesh.
Keep this list short: every name here is one more thing every rule set must place.
"""

BATCH = "batch"          # B
LENGTH = "length"        # L / S (activations only; never sharded by default)
EMBED = "embed"          # D
HEADS = "heads"          # N (query heads)
KV_HEADS = "kv_heads"    # K (key/value heads, GQA)
HEAD_DIM = "head_dim"    # H
MLP = "mlp"              # F
VOCAB = "vocab"          # V
LAYERS = "layers"        # the scanned-layer axis of stacked parameters
NORM = "norm"            # scales and biases of norms (replicated)
