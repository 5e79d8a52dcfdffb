"""filterd: a privacy-first spam and virus filter for Postfix (milter)."""

__version__ = "0.1.0"
