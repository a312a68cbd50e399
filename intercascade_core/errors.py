"""Typed errors shared by every module.

Every error a caller can provoke with bad input is an :class:`InvalidArgumentError`
(a :class:`ValueError`) that names the offending argument, so callers can catch
``ValueError`` generically or this class specifically.
"""

from __future__ import annotations

__all__ = ["IntercascadeError", "InvalidArgumentError"]


class IntercascadeError(Exception):
    """Base class of every error raised by :mod:`intercascade_core`."""


class InvalidArgumentError(IntercascadeError, ValueError):
    """An argument has a bad value, type or shape. ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
