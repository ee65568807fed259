"""The base of the domain errors: a refusal with a machine-readable code and a message for a person.

Modules raise their own subclasses (`ImageError`, `FetchError`, `ReviewError`); each web app maps
codes to HTTP statuses once, at its edge.
"""

from __future__ import annotations


class DomainError(Exception):
    """Something that cannot be done, and why: `code` for programs, `message` for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
