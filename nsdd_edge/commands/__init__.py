"""Subcommands of ``nsdd-edge`` (one module each)."""
