# SPDX-License-Identifier: MIT
"""The collection's one error base.

Every error fireap raises on purpose derives from FireapError, so a module, the action plugin
and the node handler catch one class and show its message; anything else is a bug and keeps
its traceback. This file imports nothing: the sans-IO core uses it too.
"""

from __future__ import annotations


class FireapError(Exception):
    """fireap refused an input or could not do an operation; the message is fit to show a
    user (it names the key, option or node concerned and never holds a token)."""


class InvalidValue(FireapError, ValueError):
    """A value breaks one of fireap's rules: an argument, a config entry, or a value read from
    Consul (a ValueError too, so code checking plain values can catch that)."""
