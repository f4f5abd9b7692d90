"""The version of bnfast: the one place it is written (pyproject.toml reads it
with ``attr:``, ``bnfast.__version__`` imports it)."""

__version__ = "0.1.0"
