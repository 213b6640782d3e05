"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every 4xx and 5xx."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import ErrorInfo, ErrorResponse, FieldConflict
from server.interventions.spec import entry_location

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param,
                     code=code if code is not None else status)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _is_type_tag(part: object) -> bool:
    """pydantic puts union members' type names into an error's location; they are no field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {msg}", None
    loc = []
    for part in entry_location(first.get("loc", ())[1:]):  # [0] is "body"
        if _is_type_tag(part):
            break
        loc.append(str(part))
    param = ".".join(loc) or None
    if kind == "missing" and param is None:
        return "the request body is empty: send a JSON object", None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldConflict):
        param = ".".join([*loc, cause.param])
    if kind == "extra_forbidden":
        message = f"unknown field '{param}': this server does not accept it"
    elif kind == "model_attributes_type" and param is None:
        message = f"request body must be a JSON object: {msg}"
    elif param is None:
        message = msg
    else:
        message = f"{param}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if request.method == "POST" and media != "application/json" and not media.endswith("+json"):
            # FastAPI reads such a body as bytes, which would be reported as "not a JSON object"
            return error_response(415, f"send the body as JSON with Content-Type: application/json "
                                       f"(got {content_type or 'no Content-Type'!r})", None, "unsupported_media_type")
        message, param = _describe_validation(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
