"""GET /openapi.json (the plain OpenAPI document, not in the envelope, so tools can read it)
and GET /docs (the same document as an HTML page)."""

from __future__ import annotations

import json

from quart import Blueprint, Response, current_app

from api.deps import api_context
from api.docs_html import render_docs
from api.openapi import build_document

blueprint = Blueprint("docs", __name__)


def _document_json() -> str:
    """Built once per app, on first use: the routes do not change while it serves."""
    context = api_context()
    if context.openapi_json is None:
        context.openapi_json = json.dumps(build_document(current_app.url_map), indent=2)
    return context.openapi_json


@blueprint.get("/openapi.json")
async def openapi_document() -> Response:
    return Response(_document_json(), content_type="application/json")


@blueprint.get("/docs")
async def docs_page() -> Response:
    page = render_docs(json.loads(_document_json()))
    return Response(page, content_type="text/html; charset=utf-8")
