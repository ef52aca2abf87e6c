"""Runnable, config-driven recipes: `python -m experiments.<name> [--config.key=value]`."""
