"""Typed errors. Every failure of a call is a :class:`StrataError` carrying
the gRPC status code and the daemon's message (which starts with the
offending field, e.g. ``keys[3]: ...``), so callers can branch on the type
and users can read the reason."""

from __future__ import annotations

import grpc


class StrataError(Exception):
    """A call failed. ``code`` is the gRPC status code (None when the error
    happened in the client), ``message`` the reason."""

    code: "grpc.StatusCode | None" = None

    def __init__(self, message: str, code: "grpc.StatusCode | None" = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else "CLIENT"
        return f"{name}: {self.message}"

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later unchanged."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


class InvalidArgument(StrataError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StrataError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StrataError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StrataError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(StrataError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(StrataError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StrataError):
    """The daemon is not reachable (down, restarting, wrong endpoint)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(StrataError):
    """The daemon wants a credential this client did not send, or does not
    know the one it sent (the message says which)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(StrataError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(StrataError):
    """Bytes failed their checksum (on the daemon's side or on arrival)."""

    code = grpc.StatusCode.DATA_LOSS


class ArenaChanged(StrataError):
    """The daemon restarted: the mapped arena is no longer its arena.
    Reconnect the local client."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE = {c.code: c for c in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied,
                                FailedPrecondition, ResourceExhausted, Unavailable,
                                DeadlineExceeded, DataLoss, Unauthenticated)}


def from_rpc(err: grpc.RpcError) -> StrataError:
    """The typed error for a failed gRPC call."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    message = details or str(err)
    cls = _BY_CODE.get(code, StrataError)
    return cls(message, code)
