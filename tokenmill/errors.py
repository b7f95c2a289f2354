"""tokenmill's exception types. The server maps each to one HTTP status and an OpenAI error body."""


class TokenmillError(Exception):
    """Base class for every error tokenmill raises on purpose."""

    http_status = 500
    error_type = "internal_error"


class InvalidRequestError(TokenmillError, ValueError):
    """The caller asked for something invalid: a bad parameter value, an empty prompt, a too-long prompt."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedParameterError(InvalidRequestError):
    """A parameter tokenmill does not implement: rejected, never silently ignored."""


class ModelLoadError(TokenmillError):
    """A model file or directory is missing, truncated, corrupt or of an unsupported kind."""

    error_type = "model_load_error"

    def __init__(self, path: object, problem: str):
        super().__init__(f"cannot load model from {path}: {problem}")
        self.path = str(path)
        self.problem = problem


class ConfigError(TokenmillError, ValueError):
    """An engine option is out of range or contradicts another one."""

    error_type = "config_error"


class EngineDeadError(TokenmillError):
    """The engine process died; no request can be served until it is restarted."""

    http_status = 503
    error_type = "engine_dead"


class RequestTimeoutError(TokenmillError):
    """The request's deadline (its `timeout`, or the server's --request-timeout) passed before it finished;
    it was aborted and its KV blocks freed."""

    http_status = 408
    error_type = "timeout"

    def __init__(self, message: str, param: str | None = "timeout"):
        super().__init__(message)
        self.param = param


class QueueFullError(TokenmillError):
    """The waiting queue is over its limit: the caller should retry later."""

    http_status = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float = 1.0, reason: str = "queue_full"):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class StepInterrupted(Exception):
    """Not an error: a runner abandoned a step part-way because the engine asked it to (EngineCore.step
    catches it and plans the next step). It never reaches a caller."""
