"""The API describes itself: /openapi.json (plain OpenAPI 3.1) covers every route, and what
the API answers matches it; /docs renders it without any outside resource."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import SecretStr
from quart import Response
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from api.app import create_app
from api.openapi import UNDOCUMENTED_ENDPOINTS, build_document, openapi_path
from api.schemas import CHANNEL_CREATE, CHANNEL_MODIFY, MESSAGE_SEND
from api.supervisor_link import SupervisorLink
from ipc.payloads import EventType, VumiEvent
from tests.api.fake_management import FakeManagement, serving
from tests.api.harness import open_api

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]

IMPLICIT_METHODS = {"HEAD", "OPTIONS"}


async def _document(api: Api) -> JsonObject:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    document: JsonObject = await response.get_json()
    return document


def _structure_errors(document: JsonObject) -> list[str]:
    """The parts of OpenAPI 3.1 this document relies on, checked without a validator."""
    errors = []
    if document.get("openapi") != "3.1.0":
        errors.append("openapi is not 3.1.0")
    if not {"title", "version"} <= set(document.get("info", {})):
        errors.append("info needs title and version")
    schemas = document.get("components", {}).get("schemas", {})
    ids = []
    for path, methods in document["paths"].items():
        placeholders = set(re.findall(r"{([^}]+)}", path))
        for method, operation in methods.items():
            ids.append(operation["operationId"])
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            if declared != placeholders:
                errors.append(f"{method} {path}: path parameters {declared} != {placeholders}")
            if not operation["responses"]:
                errors.append(f"{method} {path}: no responses")
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document))
    assert refs, "the document uses component schemas"
    errors.extend(f"dangling $ref {ref}" for ref in refs if ref not in schemas)
    if len(ids) != len(set(ids)):
        errors.append("operationIds are not unique")
    for name, schema in schemas.items():
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            errors.append(f"schema {name}: {exc.message}")
    return errors


async def test_openapi_json_is_a_plain_valid_document(http_api: Api) -> None:
    document = await _document(http_api)
    assert "result" not in document  # tools read it as it is: no envelope
    assert _structure_errors(document) == []
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(document)


def _routes(url_map: Any) -> set[tuple[str, str]]:
    return {
        (openapi_path(rule.rule), method.lower())
        for rule in url_map.iter_rules()
        if rule.endpoint not in UNDOCUMENTED_ENDPOINTS
        for method in rule.methods - IMPLICIT_METHODS
    }


async def test_every_route_is_documented_with_its_methods(http_api: Api) -> None:
    document = await _document(http_api)
    documented = {
        (path, method) for path, methods in document["paths"].items() for method in methods
    }
    app = http_api.client.app
    routes = _routes(app.url_map)
    assert routes == documented
    # The two describing endpoints are the only ones left out.
    described = {rule.endpoint for rule in app.url_map.iter_rules()} - UNDOCUMENTED_ENDPOINTS
    # operationIds are endpoint names (a second path of one view adds _2).
    endpoints = {re.sub(r"_\d+$", "", op["operationId"]) for op in _operations(document)}
    assert endpoints == described


def _operations(document: JsonObject) -> list[JsonObject]:
    return [op for methods in document["paths"].values() for op in methods.values()]


async def test_request_bodies_are_the_validation_schemas(http_api: Api) -> None:
    document = await _document(http_api)
    schemas = document["components"]["schemas"]
    assert schemas["ChannelCreate"] == CHANNEL_CREATE
    assert schemas["ChannelModify"] == CHANNEL_MODIFY
    assert schemas["MessageSend"] == MESSAGE_SEND
    bodies = {
        (path, method): op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, methods in document["paths"].items()
        for method, op in methods.items()
        if "requestBody" in op
    }
    assert bodies == {
        ("/channels/", "post"): "#/components/schemas/ChannelCreate",
        ("/channels/{channel_id}", "post"): "#/components/schemas/ChannelModify",
        ("/channels/{channel_id}/messages/", "post"): "#/components/schemas/MessageSend",
        ("/routers/", "post"): "#/components/schemas/RouterCreate",
        ("/routers/{router_id}", "put"): "#/components/schemas/RouterCreate",
        ("/routers/{router_id}", "patch"): "#/components/schemas/RouterPatch",
        ("/routers/{router_id}/destinations/", "post"): "#/components/schemas/DestinationCreate",
        (
            "/routers/{router_id}/destinations/{destination_id}",
            "put",
        ): "#/components/schemas/DestinationCreate",
        (
            "/routers/{router_id}/destinations/{destination_id}",
            "patch",
        ): "#/components/schemas/DestinationPatch",
        (
            "/routers/{router_id}/destinations/{destination_id}/messages/",
            "post",
        ): "#/components/schemas/MessageSend",
        (
            "/routers/{router_id}/destinations/{destination_id}/messages",
            "post",
        ): "#/components/schemas/MessageSend",
    }


def test_a_route_without_a_description_is_refused(embedded_settings: Settings) -> None:
    app = create_app(embedded_settings, supervisor=SupervisorLink(None))

    async def extra() -> Response:
        return Response("{}")

    app.add_url_rule("/extra", "extra.view", extra)
    with pytest.raises(LookupError, match="/extra"):
        build_document(app.url_map)


async def test_docs_page_lists_every_operation_and_needs_nothing_outside(http_api: Api) -> None:
    response = await http_api.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = await response.get_data(as_text=True)
    document = await _document(http_api)
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert f'id="op-{operation["operationId"]}"' in page
            assert f'<span class="method {method}">{method.upper()}</span>' in page
            assert f'<span class="path">{path}</span>' in page
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    assert "<script" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


class _Conformance:
    """Validates responses against the document's schema for (path template, method, status)."""

    def __init__(self, document: JsonObject) -> None:
        self.document = document
        resource: Resource[Any] = DRAFT202012.create_resource(document)
        self.registry: Registry[Any] = Registry().with_resource("urn:openapi", resource)
        self.checked: set[tuple[str, str, int]] = set()

    def check(self, path: str, method: str, status: int, body: object) -> None:
        responses = self.document["paths"][path][method]["responses"]
        assert str(status) in responses, (path, method, status, body)
        pointer = "/".join(
            part.replace("~", "~0").replace("/", "~1")
            for part in ["paths", path, method, "responses", str(status), "content"]
        )
        schema = {"$ref": f"urn:openapi#/{pointer}/application~1json/schema"}
        Draft202012Validator(schema, registry=self.registry).validate(body)
        self.checked.add((path, method, status))


async def test_answers_match_the_document(api: Api) -> None:
    conformance = _Conformance(await _document(api))

    async def call(template: str, method: str, url: str, body: object = None) -> JsonObject:
        kwargs: JsonObject = {} if body is None else {"json": body}
        response = await api.client.open(url, method=method.upper(), **kwargs)
        payload: JsonObject = await response.get_json()
        conformance.check(template, method, response.status_code, payload)
        return payload

    created = await call(
        "/channels/",
        "post",
        "/channels/",
        {"type": "fake", "config": {"host": "h"}, "mo_url": "http://example.com/mo"},
    )
    cid = created["result"]["id"]
    await call("/channels/", "post", "/channels/", {"type": 1})
    await call("/channels/", "get", "/channels/")
    await call("/channels/{channel_id}", "get", f"/channels/{cid}")
    await call("/channels/{channel_id}", "get", "/channels/nope")
    await call("/channels/{channel_id}", "post", f"/channels/{cid}", {"label": "x"})
    sent = await call(
        "/channels/{channel_id}/messages/",
        "post",
        f"/channels/{cid}/messages/",
        {"to": "+1", "content": None, "channel_data": {"continue_session": True}},
    )
    mid = sent["result"]["message_id"]
    event = VumiEvent(event_type=EventType.NACK, user_message_id=mid, nack_reason="no")
    await api.store.add_event(cid, mid, event.event_id, event.model_dump(mode="json"), 60)
    status_path = "/channels/{channel_id}/messages/{message_id}"
    status = await call(status_path, "get", f"/channels/{cid}/messages/{mid}")
    assert status["result"]["last_event_type"] == "rejected"
    await call("/channels/{channel_id}/logs", "get", f"/channels/{cid}/logs?n=2")
    await call("/channels/{channel_id}/logs", "get", f"/channels/{cid}/logs?n=x")
    await call("/channels/{channel_id}/restart", "post", f"/channels/{cid}/restart")
    await call("/health", "get", "/health")
    await call("/health/", "get", "/health/")
    await call("/channels/{channel_id}", "delete", f"/channels/{cid}")
    assert len(conformance.checked) == 14


async def test_queue_control_answers_match_the_document(api: Api) -> None:
    conformance = _Conformance(await _document(api))

    async def call(template: str, method: str, url: str, body: object = None) -> JsonObject:
        kwargs: JsonObject = {} if body is None else {"json": body}
        response = await api.client.open(url, method=method.upper(), **kwargs)
        payload: JsonObject = await response.get_json()
        conformance.check(template, method, response.status_code, payload)
        return payload

    cid = await api.create_channel(mo_url="http://example.com/mo", queue_limit=1)
    base = "/channels/{channel_id}"
    await call(f"{base}/pause", "post", f"/channels/{cid}/pause")
    await call(f"{base}/resume", "post", f"/channels/{cid}/resume")
    await call(f"{base}/pause", "post", "/channels/nope/pause")
    send = f"{base}/messages/"
    sent = await call(send, "post", f"/channels/{cid}/messages/", {"to": "1", "content": "x"})
    await call(send, "post", f"/channels/{cid}/messages/", {"to": "1", "content": "x"})
    mid = sent["result"]["message_id"]
    status = await call(f"{base}/messages/{{message_id}}", "get", f"/channels/{cid}/messages/{mid}")
    assert [entry["stage"] for entry in status["result"]["timeline"]] == ["accepted", "queued"]
    one = f"{base}/messages/{{message_id}}"
    await call(one, "delete", f"/channels/{cid}/messages/{mid}")
    await call(one, "delete", f"/channels/{cid}/messages/unknown")
    await call(f"{base}/messages/cancel", "post", f"/channels/{cid}/messages/cancel")
    await call(f"{base}/logs", "get", f"/channels/{cid}/logs?message_id={mid}")
    channel = await call(base, "get", f"/channels/{cid}")
    assert channel["result"]["status"]["queues"]["outbound"] == 1
    assert conformance.checked == {
        (f"{base}/pause", "post", 200),
        (f"{base}/resume", "post", 200),
        (f"{base}/pause", "post", 404),
        (send, "post", 201),
        (send, "post", 429),
        (f"{base}/messages/{{message_id}}", "get", 200),
        (one, "delete", 200),
        (one, "delete", 400),
        (f"{base}/messages/cancel", "post", 200),
        (f"{base}/logs", "get", 200),
        (base, "get", 200),
    }


async def test_unauthorized_answers_match_the_document(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    settings = embedded_settings.model_copy(update={"api_tokens": [SecretStr("t0ken")]})
    async with open_api(settings, socket_dir) as api:
        response = await api.client.get("/openapi.json", headers={"Authorization": "Bearer t0ken"})
        document: JsonObject = await response.get_json()
        conformance = _Conformance(document)
        for path, methods in document["paths"].items():
            for method, operation in methods.items():
                url = path.replace("{", "").replace("}", "")
                no_body: JsonObject = {}
                answer = await api.client.open(url, method=method.upper(), **no_body)
                if operation.get("security") == []:
                    assert answer.status_code != 401, (path, method)
                    continue
                assert answer.status_code == 401, (path, method)
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                conformance.check(path, method, 401, await answer.get_json())
        assert len(conformance.checked) > 20


async def test_metrics_is_documented_as_prometheus_text(http_api: Api) -> None:
    document = await _document(http_api)
    operation = document["paths"]["/metrics"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/plain; version=0.0.4"]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    send = document["paths"]["/channels/{channel_id}/messages/"]["post"]
    assert "Retry-After" in send["responses"]["429"]["headers"]
    assert {p["name"] for p in send["parameters"]} == {"channel_id", "Idempotency-Key"}


async def test_queue_reports_match_the_document(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    fake = FakeManagement()
    async with serving(fake) as address:
        settings = embedded_settings.model_copy(update={"rabbitmq_management_interface": address})
        async with open_api(settings, socket_dir) as api:
            conformance = _Conformance(await _document(api))
            channel_id = await api.create_channel()
            inbound, outbound, _ = api.namespace.channel_queues(channel_id)
            stats = {"ack_details": {"rate": 0.0}}
            fake.queues[inbound] = {"name": inbound, "messages": 3, "message_stats": stats}
            fake.queues[outbound] = {"name": outbound, "messages": 0}
            for expected in (500, 200):
                response = await api.client.get("/health")
                assert response.status_code == expected
                conformance.check("/health", "get", expected, await response.get_json())
                fake.queues[inbound]["messages"] = 0
