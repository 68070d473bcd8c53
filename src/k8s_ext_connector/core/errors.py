"""Errors mapped once: invalid input (a user must fix it) versus transient failures."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid input. Names the field path and the offending value so one line is enough."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {value!r}: {reason}" if field else f"{value!r}: {reason}")

    def within(self, prefix: str) -> ConfigError:
        """The same error with its field path nested under ``prefix`` (e.g. a file name)."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(field, self.value, self.reason)


class TransientError(RuntimeError):
    """A failure worth retrying with backoff (a peer down, a command racing another)."""
