"""Logical axes, the device mesh and the rule sets that connect them."""
