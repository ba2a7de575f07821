"""Registry errors: each message names the problem and the fix."""
from __future__ import annotations


class RegistryError(ValueError):
    """A registry operation was refused; nothing was changed."""


class VerificationFailed(RegistryError):
    """Older tasks no longer reproduce their stored outputs; the change that caused it was rolled back."""

    def __init__(self, message: str, report) -> None:
        super().__init__(message)
        self.report = report
