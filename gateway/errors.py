"""Errors a request can end with; each dialect renders them in the body shape its clients expect."""

from __future__ import annotations


class GatewayError(Exception):
    """A client-visible failure: HTTP status plus a message that says what to fix."""

    status: int = 500
    type: str = "server_error"  # OpenAI's error.type
    code: str | None = None  # OpenAI's error.code

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidBody(BadRequest):
    """A body that is not JSON or does not fit the route, on the seed services' routes: FastAPI answers 422."""

    status = 422


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist", param="model")
        self.model = model


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class ServerBusy(GatewayError):
    """Over the admission limits. OpenAI routes answer 429 with Retry-After; Ollama routes 503."""

    status = 429
    type = "rate_limit_error"
    code = "server_busy"


class Unavailable(GatewayError):
    """No worker can take the request now (none ready, or the one serving it died)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(GatewayError):
    status = 500
    type = "server_error"


class RequestTimeout(GatewayError):
    """The request ran past `config.request_timeout` and was aborted in the worker.

    504, not 408: the gateway gave up waiting on its worker; 408 would tell the client that *it* was slow
    to send the request. SDKs retry both.
    """

    status = 504
    type = "server_error"
    code = "timeout"


class ClientDisconnected(GatewayError):
    """The client went away before its answer was ready; nobody reads this response (nginx's 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class ClientTooSlowError(GatewayError):
    """The client read its stream so much slower than the model wrote it that the gateway gave it up
    (see gateway/request_buffer.py); the work was aborted in the worker."""

    status = 503
    type = "server_error"
    code = "client_too_slow"
