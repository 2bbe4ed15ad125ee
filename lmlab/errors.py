"""The one exception type that lmlab raises for bad input.

The CLI prints its message on one line and exits with status 2, so every message must say what is wrong and how
to fix it. Anything else escaping is a bug and keeps its traceback.
"""


class LmlabError(Exception):
    """Bad input or an unusable environment, described for the user."""
