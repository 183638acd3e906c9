"""Errors the plain Python functions raise; the gRPC layer maps each to its status code."""


class IlfError(Exception):
    """Base of the errors that carry a gRPC status."""
    code_name = "INTERNAL"


class InvalidArgument(IlfError, ValueError):
    code_name = "INVALID_ARGUMENT"


class InvalidField(InvalidArgument):
    """A request field with an unusable value: the message is the field's name and the rule it broke, kept apart
    so each protocol can name the field as its clients know it (OpenAI's max_tokens is max_new_tokens)."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field} {rule}")
        self.field, self.rule = field, rule


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


# Upstream statuses that describe the caller's request pass through; any other means the upstream failed.
_PASSED_THROUGH = {cls.code_name: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted)}


def upstream_error(service: str, error) -> IlfError:
    """The IlfError to answer with when a gRPC call (grpc.RpcError `error`) to another service fails."""
    kind = _PASSED_THROUGH.get(error.code().name, Unavailable)
    return kind(f"the {service} service answered {error.code().name}: {error.details()}")
