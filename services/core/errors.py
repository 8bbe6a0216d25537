"""The project's exception hierarchy: typed errors whose messages tell the user what to do.

Services map these to gRPC status codes in one place (services/transport/status.py); the
CLI prints them as one line. `WireError` names its status itself: malformed streams and
messages, raised by the wire format (services.common.wire) and the transport alike.
"""

from __future__ import annotations


class FLClusteringError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(FLClusteringError, ValueError):
    """A flag, option or argument has a value that cannot work."""


class DatasetUnavailableError(FLClusteringError, FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


class PreconditionError(FLClusteringError):
    """An algorithm's precondition does not hold (and no fallback was allowed)."""


class SpecMismatchError(FLClusteringError, ValueError):
    """Tensors do not match the model's specification (names, shapes, dtypes)."""


class NotFoundError(FLClusteringError, LookupError):
    """An unknown participant, model version or other named thing."""


class StateError(FLClusteringError):
    """The request does not fit the current state: wrong round, duplicate, too late."""


class StaleError(StateError):
    """--mode async: an update trained from a version too old (or no longer kept)."""


class AuthError(FLClusteringError):
    """The caller could not be authenticated."""


class ForbiddenError(FLClusteringError):
    """The caller is known but may not do this (another party's id, a service's RPC)."""


class CapacityError(FLClusteringError):
    """A configured limit is reached (participants, streams): try later or elsewhere."""


class WireError(FLClusteringError):
    """A stream of weights is malformed; `code` names the gRPC status it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> WireError:
    """Malformed content (names, shapes, dtypes, values)."""
    return WireError("INVALID_ARGUMENT", message)
