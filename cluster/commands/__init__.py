"""One module per group of ``attribution`` subcommands.

Each module defines ``register(subparsers)``, which adds its parsers and sets ``func``
(called with the parsed namespace); ``cluster.cli`` discovers them. ``stages`` adds one
subcommand per registered stage; ``run`` the whole pipeline; ``submit`` / ``job`` the
Ray job client; ``compare`` several experiments side by side.

A command does not print its own errors: it raises the project's error types (their
messages name the problem and the fix) and :func:`cluster.cli.main` prints every one the
same way (one ``error:`` line, exit code 2; ``--debug`` adds the traceback).
"""
