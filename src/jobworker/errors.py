"""The project's errors; each expected kind maps to one gRPC status code in server/errors.py."""


class JobWorkerError(Exception):
    """Base of every error the project raises on purpose."""


class InvalidArgument(JobWorkerError):
    """A request is malformed; the message names the job and the field."""


class ResourceExhausted(JobWorkerError):
    """A configured limit was reached; the message names the limit."""


class NotFound(JobWorkerError):
    """The batch does not exist or the caller may not see it."""


class FailedPrecondition(JobWorkerError):
    """The batch is not in a state that allows this (deleting one that has jobs left)."""


class Unauthenticated(JobWorkerError):
    """The client certificate names no usable identity, or it is revoked."""


class PermissionDenied(JobWorkerError):
    """The caller's role does not allow this."""


class Unavailable(JobWorkerError):
    """The server is draining for shutdown."""


class ConfigError(JobWorkerError):
    """The config file is invalid; the message names the key, the value and what is allowed."""
