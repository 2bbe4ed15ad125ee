"""lmlab: a hands-on laboratory for language models."""

__version__ = "0.1.0"
