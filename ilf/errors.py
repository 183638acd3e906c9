"""Errors the plain Python functions raise; the gRPC layer maps each to its status code."""


class IlfError(Exception):
    """Base of the errors that carry a gRPC status."""
    code_name = "INTERNAL"


class InvalidArgument(IlfError, ValueError):
    code_name = "INVALID_ARGUMENT"


class NotFound(IlfError, LookupError):
    code_name = "NOT_FOUND"


class AlreadyExists(IlfError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(IlfError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(IlfError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(IlfError):
    code_name = "UNAVAILABLE"
