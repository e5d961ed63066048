"""The one Transformer: config, block, scanned stack, presets."""
