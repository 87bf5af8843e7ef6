"""How the router reads a PD instance's error (rtpllm/pd/protocol.py): an error reply, or an error
event in decode's stream, as the OpenAI error the client gets."""

from __future__ import annotations

import json

from rtpllm.router.sse import EventSplitter, event_json
from rtpllm.serving.errors import OpenAIError


def upstream_error(status: int, payload: bytes, side: str) -> OpenAIError:
    """An instance's error reply (a JSON error body, or an SSE stream whose first event is one) as
    the client's error, with the instance's status. 401/403 mean the router's own key
    (`backend_api_key`) was refused: that is the router's fault, a 502, not the client's."""
    if status in (401, 403):
        return OpenAIError(f"the {side} instance refused the router's key (--backend-api-key)", status=502,
                           type="upstream_error")
    try:
        if payload.lstrip().startswith(b"data:"):
            body = event_json(EventSplitter().feed(payload + b"\n\n")[0])
        else:
            body = json.loads(payload)
        error = body["error"]
        return OpenAIError(str(error.get("message", "")), status=status, type=str(error.get("type", "upstream_error")),
                           param=error.get("param"), code=error.get("code"))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return OpenAIError(f"the {side} instance answered HTTP {status}", status=status if status >= 400 else 502,
                           type="upstream_error")


# An error event carries no HTTP status: its code when that is one, else one by its type; a type
# not listed is the instance's failure, not the client's (502).
_STATUS_BY_TYPE = {"invalid_request_error": 400, "not_found_error": 404, "service_unavailable": 503,
                   "server_overloaded": 503, "pd_transfer_failed": 503, "timeout": 504,
                   "internal_server_error": 500}


def event_error(error: dict) -> OpenAIError:
    """An error event's body as an error reply."""
    code = error.get("code")
    kind = str(error.get("type", "upstream_error"))
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        status = code
    else:
        status = _STATUS_BY_TYPE.get(kind, 502)
    return OpenAIError(str(error.get("message", "")), status=status, type=kind, param=error.get("param"), code=code)
