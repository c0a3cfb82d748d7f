"""The engine's one exception hierarchy.

Every error carries the protocol's ErrorType (so the gRPC layer maps it
without guessing), the id of the node it concerns (if any) and a message a
user can act on.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class ErrorType(enum.IntEnum):
    """Mirrors remotemedia.v1.ErrorType."""

    UNSPECIFIED = 0
    VALIDATION = 1
    NODE_EXECUTION = 2
    RESOURCE_LIMIT = 3
    AUTHENTICATION = 4
    VERSION_MISMATCH = 5
    INTERNAL = 6
    TYPE_VALIDATION = 7


class EngineError(Exception):
    """Base of all engine errors."""

    error_type: ErrorType = ErrorType.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        context: dict[str, Any] | None = None,
        traceback_text: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.node_id = node_id
        self.context = context or {}
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        where = f"[node {self.node_id}] " if self.node_id else ""
        return f"{where}{self.message}"


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found while validating a manifest."""

    path: str  # JSON path, e.g. "$.nodes[2].params.chunk_size"
    message: str
    node_id: str | None = None
    field: str | None = None
    code: str = "invalid"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        where = f"node {self.node_id!r}: " if self.node_id else ""
        return f"{self.path}: {where}{self.message}"


class ValidationError(EngineError):
    """A manifest or an input is invalid; carries every issue found."""

    error_type = ErrorType.VALIDATION

    def __init__(self, issues: list[Issue] | Issue | str, *, node_id: str | None = None) -> None:
        if isinstance(issues, str):
            issues = [Issue(path="$", message=issues, node_id=node_id)]
        elif isinstance(issues, Issue):
            issues = [issues]
        self.issues: list[Issue] = list(issues)
        first = self.issues[0] if self.issues else None
        if len(self.issues) == 1 and first is not None:
            message = str(first)
        else:
            message = f"{len(self.issues)} problems:\n" + "\n".join(f"  - {i}" for i in self.issues)
        super().__init__(
            message,
            node_id=node_id or (first.node_id if first else None),
            context={"issues": [_issue_dict(i) for i in self.issues]},
        )


def _issue_dict(issue: Issue) -> dict[str, Any]:
    d: dict[str, Any] = {"path": issue.path, "message": issue.message, "code": issue.code}
    if issue.node_id:
        d["node_id"] = issue.node_id
    if issue.field:
        d["field"] = issue.field
    if issue.extra:
        d["extra"] = issue.extra
    return d


class TypeValidationError(EngineError):
    """Data of the wrong type or shape reached a node or the wire."""

    error_type = ErrorType.TYPE_VALIDATION


class NodeExecutionError(EngineError):
    """A node failed while initializing or processing, or its process died."""

    error_type = ErrorType.NODE_EXECUTION


class ResourceLimitError(EngineError):
    """A configured limit (processes, sessions, memory, time, size) was exceeded."""

    error_type = ErrorType.RESOURCE_LIMIT


class AuthenticationError(EngineError):
    error_type = ErrorType.AUTHENTICATION


class VersionMismatchError(EngineError):
    error_type = ErrorType.VERSION_MISMATCH


class InternalError(EngineError):
    error_type = ErrorType.INTERNAL


class SessionClosedError(EngineError):
    """An operation on a session that was closed or cancelled."""

    error_type = ErrorType.VALIDATION


#: every class a node or the engine raises, by name (how an error crosses a
#: process boundary: the same class and message arrive on the other side)
ERROR_CLASSES: dict[str, type[EngineError]] = {c.__name__: c for c in (
    EngineError, ValidationError, TypeValidationError, NodeExecutionError, ResourceLimitError,
    AuthenticationError, VersionMismatchError, InternalError, SessionClosedError)}

#: ErrorType → the class a subclass unknown here arrives as
CLASS_OF_TYPE: dict[ErrorType, type[EngineError]] = {
    ErrorType.UNSPECIFIED: EngineError,
    ErrorType.VALIDATION: ValidationError,
    ErrorType.NODE_EXECUTION: NodeExecutionError,
    ErrorType.RESOURCE_LIMIT: ResourceLimitError,
    ErrorType.AUTHENTICATION: AuthenticationError,
    ErrorType.VERSION_MISMATCH: VersionMismatchError,
    ErrorType.INTERNAL: InternalError,
    ErrorType.TYPE_VALIDATION: TypeValidationError,
}


def error_class(name: str, error_type: str | int) -> type[EngineError]:
    """The class an error named `name` (of `error_type`, a name or number) is rebuilt as."""
    cls = ERROR_CLASSES.get(name)
    if cls is not None:
        return cls
    try:
        kind = ErrorType[error_type] if isinstance(error_type, str) else ErrorType(error_type)
    except (KeyError, ValueError):
        kind = ErrorType.INTERNAL
    return CLASS_OF_TYPE[kind]


def rebuild_error(name: str, error_type: str | int, message: str, *, node_id: str | None,
                  context: dict[str, Any] | None = None, traceback_text: str = "") -> EngineError:
    """An error that crossed a process boundary, as the class it was raised as."""
    cls = error_class(name, error_type)
    err = cls.__new__(cls)
    EngineError.__init__(err, message, node_id=node_id, context=dict(context or {}),
                         traceback_text=traceback_text)
    if isinstance(err, ValidationError):
        err.issues = [Issue(**{k: v for k, v in i.items() if k in _ISSUE_FIELDS})
                      for i in err.context.get("issues", []) if isinstance(i, dict)]
    return err


_ISSUE_FIELDS = {"path", "message", "node_id", "field", "code", "extra"}
