"""The annotation page: people read a failing program next to the tests it fails, write feedback, try a fix.

Served by the feedback service on ILF_FEEDBACK_HTTP_PORT (off when empty), over the same core, store, checks and
tokens as its gRPC API (README, "The annotation page").
"""
from __future__ import annotations

from ilf.auth import configured_tokens
from services.feedback.config import FeedbackConfig
from services.feedback.service import FeedbackService
from services.feedback.web.app import AnnotationPage, WebServer, ssl_context


def annotation_page(service: FeedbackService, settings: FeedbackConfig) -> WebServer | None:
    """The page's server, not started, when the settings give it a port."""
    if settings.http_port is None:
        return None
    page = AnnotationPage(service, tokens=configured_tokens(settings.server.bind_host), lease_s=settings.lease_s,
                          ssl_context=ssl_context())
    return WebServer(page, host=settings.server.bind_host, port=settings.http_port)
