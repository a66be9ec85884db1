"""The errors a user fixes by changing a flag or a file, and how fairseq's command-line tools print them.

Raised from Python they are ordinary exceptions (``ConfigError`` is a ValueError, ``CheckpointError`` a
RuntimeError). In a fairseq command-line tool (fairseq-train, -generate, -interactive, -eval-lm, ...) an
uncaught one is printed as one line, ``fairseq-train: error: <message>``, without a traceback, and the process
exits with status 1, as argparse reports a bad flag.
"""

import os
import sys


class UserError(Exception):
    """An error whose message says what to change; the command-line tools print it without a traceback."""


class ConfigError(UserError, ValueError):
    """A flag, a flag combination or a size that cannot work (for example a group count that does not divide a
    layer size); the message names the flag or argument."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read: empty, truncated, corrupt, or not a PyTorch file at all."""


def _print_user_errors(fallback):
    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr, flush=True)
            return
        fallback(exc_type, exc, tb)

    excepthook.grnn_user_errors = True
    return excepthook


def install_cli_errors() -> None:
    """In a fairseq command-line tool, print uncaught ``UserError`` as one line (idempotent)."""
    tool = os.path.basename(sys.argv[0] if sys.argv else "")
    if tool.startswith("fairseq-") and not getattr(sys.excepthook, "grnn_user_errors", False):
        sys.excepthook = _print_user_errors(sys.excepthook)
