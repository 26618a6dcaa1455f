"""Subcommands of ``tspo``: one module each, discovered by ``tspo.cli``.

A module here defines ``register(subparsers)``, adds its parser and sets ``handler=`` via
``parser.set_defaults``; the handler takes the parsed namespace and returns an exit code. Raise
``tspo.errors.CLIError`` for user errors (bad path, bad value) so the message is printed cleanly.
"""
