"""HTTP error responses in one shape: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

from aiohttp import web

from relayd.errors import AuthError, ClientError

# The error code of a response made here, for middlewares (relayd/web/throttle.py).
ERROR_CODE = web.ResponseKey("error_code", str)


def error_response(status: int, code: str, message: str) -> web.Response:
    response = web.json_response({"error": {"code": code, "message": message}}, status=status)
    response[ERROR_CODE] = code
    return response


def client_error_response(exc: ClientError) -> web.Response:
    status = exc.http_status if isinstance(exc, AuthError) else 400
    return error_response(status, exc.code, exc.message)
