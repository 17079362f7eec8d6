"""The config error type and its check, shared by every config section.

Kept apart from ``genrec.config`` so that sections living beside their stage's code
(``genrec.interests.config``, ``genrec.methods.gream.config``) can use them while
``genrec.config`` imports those sections.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond holds."""
    if not cond:
        raise ConfigError(msg)
