"""Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import re
from typing import Optional, Union

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rtpllm.engine.async_engine import EngineDeadError, EngineOverloadedError
from rtpllm.serving.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# What a 503 tells clients to wait before retrying: a step or two frees batch slots.
RETRY_AFTER_S = "1"

# Our ValueErrors start with the offending field: "top_p: must be in (0, 1], got 2.0".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class OpenAIError(Exception):
    """An error answered to the client; raising it anywhere in a handler becomes the HTTP reply."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[Union[int, str]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}  # extra response headers (Retry-After, WWW-Authenticate)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code if self.code is not None else self.status))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers or None)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(message, status=400, param=param, code=code)


def from_value_error(error: ValueError, default_param: Optional[str] = None) -> OpenAIError:
    """A 400 from our own validation errors, whose messages begin with the field name."""
    message = str(error)
    match = _FIELD_PREFIX.match(message)
    return bad_request(message, param=match.group(1) if match else default_param)


def from_validation_error(error: ValidationError) -> OpenAIError:
    """A 400 naming the first invalid field of a request body."""
    errors = error.errors(include_url=False, include_input=False)
    # Of a union's errors, ours (a bound) says more than "Input should be a valid string".
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    location = [str(part) for part in first["loc"]]
    # Union members show up as extra path parts ("prompt.str", "prompt.list[int]"): keep the field path.
    location = [p for p in location if not (p in {"str", "int", "float", "bool"} or "[" in p)]
    param = ".".join(location) or None
    detail = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        detail = "field required"
    return bad_request(f"{param}: {detail}" if param else detail, param=param)


def to_openai_error(error: BaseException) -> OpenAIError:
    """The reply for any exception a handler lets through; unexpected ones are logged as 500s."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, EngineOverloadedError):
        overloaded = OpenAIError(str(error), status=503, type="server_overloaded", code="server_overloaded")
        overloaded.headers["Retry-After"] = RETRY_AFTER_S
        return overloaded
    if isinstance(error, EngineDeadError):
        return OpenAIError(str(error), status=503, type="service_unavailable", code="engine_unavailable")
    logger.error("request failed", exc_info=error)
    return OpenAIError(f"internal server error: {error!r}", status=500, type="internal_server_error")
