"""The llmjax CLI subcommands (one module each, registered in llmjax/cli.py)."""
