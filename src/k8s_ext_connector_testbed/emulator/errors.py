"""API errors as the real server reports them: a ``kind: Status`` body with reason and code.

Clients branch on ``reason`` and ``code`` (kubectl apply creates on NotFound, kopf retries
on Conflict), so these must match the real server's, not just the HTTP status.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API failure that the server answers with a Status object (hooks may raise it)."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
            **({"details": self.details} if self.details else {}),
        }

    @classmethod
    def about(cls, code: int, reason: str, qualified: str, name: str, text: str) -> ApiError:
        """An error about one object; ``qualified`` is ``plural[.group]`` as in real messages."""
        plural, _, group = qualified.partition(".")
        details = {"name": name, **({"group": group} if group else {}), "kind": plural}
        return cls(code, reason, text.format(f'{qualified} "{name}"'), **details)

    @classmethod
    def not_found(cls, qualified: str, name: str) -> ApiError:
        return cls.about(404, "NotFound", qualified, name, "{} not found")

    @classmethod
    def exists(cls, qualified: str, name: str) -> ApiError:
        return cls.about(409, "AlreadyExists", qualified, name, "{} already exists")

    @classmethod
    def conflict(cls, qualified: str, name: str) -> ApiError:
        return cls.about(
            409,
            "Conflict",
            qualified,
            name,
            "Operation cannot be fulfilled on {}: "
            "the object has been modified; please apply your changes to the "
            "latest version and try again",
        )

    @classmethod
    def invalid(cls, qualified: str, name: str, why: str) -> ApiError:
        return cls.about(
            422,
            "Invalid",
            qualified,
            name,
            "{} is invalid: " + why.replace("{", "{{").replace("}", "}}"),
        )

    @classmethod
    def not_found_path(cls) -> ApiError:
        return cls(404, "NotFound", "the server could not find the requested resource")

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequest", message)
