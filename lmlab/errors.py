"""The exceptions lmlab raises for the user.

The CLI prints an LmlabError's message on one line and exits with status 2, so every message must say what is
wrong and how to fix it. Anything else escaping is a bug and keeps its traceback.
"""


class LmlabError(Exception):
    """Bad input or an unusable environment, described for the user."""


class Damaged(LmlabError):
    """A file that exists but cannot be read back (truncated, overwritten): a resumed run falls back to an older
    checkpoint on it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command after it saved its state; the CLI exits with 128 + the signal number
    (130, 143), as a shell reports a process killed by it."""

    def __init__(self, signum: int, message: str, resumable: bool = True):
        super().__init__(message)
        # resumable: the saved state continues the run; how (a --resume flag, or the same command again, as the lab's
        # experiments do) is the command's to say: the CLI adds it.
        self.signum, self.exit_code, self.resumable = signum, 128 + signum, resumable
