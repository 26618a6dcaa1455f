"""Errors shared by the command line and the command modules.

``CLIError`` lives here, not in ``tspo.cli``: the commands raise it and ``tspo.cli`` imports the
commands, and under ``python -m tspo.cli`` the module runs as ``__main__``, so a class defined there
would exist twice and the handler would not catch the commands' errors.
"""

from __future__ import annotations


class CLIError(Exception):
    """An error caused by the user's input; printed without a traceback."""
