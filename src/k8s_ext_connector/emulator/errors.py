"""API errors as the real server reports them: a ``kind: Status`` body with reason and code.

Clients branch on ``reason`` and ``code`` (kubectl apply creates on NotFound, kopf retries
on Conflict), so these must match the real server's, not just the HTTP status.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API failure that the server answers with a Status object."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def _details(qualified: str, name: str) -> dict[str, str]:
        plural, _, group = qualified.partition(".")
        return {"name": name, "group": group, "kind": plural} if group else {
            "name": name, "kind": plural}

    @classmethod
    def not_found(cls, qualified: str, name: str) -> ApiError:
        return cls(404, "NotFound", f'{qualified} "{name}" not found',
                   **cls._details(qualified, name))

    @classmethod
    def not_found_path(cls) -> ApiError:
        return cls(404, "NotFound", "the server could not find the requested resource")

    @classmethod
    def exists(cls, qualified: str, name: str) -> ApiError:
        return cls(409, "AlreadyExists", f'{qualified} "{name}" already exists',
                   **cls._details(qualified, name))

    @classmethod
    def conflict(cls, qualified: str, name: str) -> ApiError:
        return cls(409, "Conflict",
                   f'Operation cannot be fulfilled on {qualified} "{name}": the object has been '
                   "modified; please apply your changes to the latest version and try again",
                   **cls._details(qualified, name))

    @classmethod
    def invalid(cls, qualified: str, name: str, why: str) -> ApiError:
        return cls(422, "Invalid", f'{qualified} "{name}" is invalid: {why}',
                   **cls._details(qualified, name))

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequest", message)

    @classmethod
    def gone(cls, message: str) -> ApiError:
        return cls(410, "Expired", message)
