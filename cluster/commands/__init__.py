"""One module per ``attribution`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace). ``cluster.cli`` discovers them.
"""
