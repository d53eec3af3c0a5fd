"""HTTP error responses in one shape: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

from aiohttp import web

from relayd.errors import AuthError, ClientError


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def client_error_response(exc: ClientError) -> web.Response:
    status = exc.http_status if isinstance(exc, AuthError) else 400
    return error_response(status, exc.code, exc.message)
