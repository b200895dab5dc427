"""The /docs page: the OpenAPI document rendered to one self-contained HTML page, server-side
(no scripts, no CDN: gateways often run without internet access)."""

from __future__ import annotations

import html
import json
from typing import Any

JsonObject = dict[str, Any]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.5rem; }
.op { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: 0.6rem 1rem; }
.method { display: inline-block; min-width: 4.5rem; font-weight: bold; font-family: monospace; }
.get { color: #0b7a3b; } .post { color: #1d5fbf; } .delete { color: #b3261e; }
.path { font-family: monospace; font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.4rem 0; }
td, th { border: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
nav a { font-family: monospace; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _schema_html(schema: JsonObject) -> str:
    """A $ref becomes a link to its component; anything else is shown as JSON."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and len(schema) == 1:
        name = ref.rsplit("/", 1)[-1]
        return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
    return f"<pre>{_e(json.dumps(schema, indent=2))}</pre>"


def _parameters_html(parameters: list[JsonObject]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
        f"<td>{'yes' if p.get('required') else 'no'}</td>"
        f"<td><code>{_e(json.dumps(p.get('schema', {})))}</code></td>"
        f"<td>{_e(p.get('description', ''))}</td></tr>"
        for p in parameters
    )
    return (
        "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>required</th>"
        f"<th>schema</th><th>description</th></tr>{rows}</table>"
    )


def _result_schema(response: JsonObject) -> JsonObject | None:
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if not isinstance(schema, dict):
        return None
    result = schema.get("properties", {}).get("result")
    return result if isinstance(result, dict) else schema


def _operation_html(path: str, method: str, operation: JsonObject) -> str:
    parts = [
        f'<div class="op" id="op-{_e(operation["operationId"])}">',
        f'<span class="method {_e(method)}">{_e(method.upper())}</span>',
        f'<span class="path">{_e(path)}</span>',
        f"<p>{_e(operation.get('summary', ''))}</p>",
    ]
    if operation.get("parameters"):
        parts.append(_parameters_html(operation["parameters"]))
    body = operation.get("requestBody")
    if body:
        schema = body["content"]["application/json"]["schema"]
        parts.append(f"<h4>Request body (JSON)</h4>{_schema_html(schema)}")
    rows = []
    for status, response in operation["responses"].items():
        result = _result_schema(response)
        shown = _schema_html(result) if result is not None else ""
        rows.append(
            f"<tr><td>{_e(status)}</td><td>{_e(response['description'])}</td><td>{shown}</td></tr>"
        )
    parts.append(
        "<h4>Responses</h4><table><tr><th>status</th><th>description</th>"
        f"<th>result</th></tr>{''.join(rows)}</table>"
    )
    parts.append("</div>")
    return "".join(parts)


def render_docs(document: JsonObject) -> str:
    """The whole page for `document` (an OpenAPI 3.1 document from api.openapi)."""
    info = document["info"]
    operations = [
        (path, method, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    index = "".join(
        f'<li><a href="#op-{_e(op["operationId"])}">{_e(method.upper())} {_e(path)}</a></li>'
        for path, method, op in operations
    )
    schemas = "".join(
        f'<h3 id="schema-{_e(name)}">{_e(name)}</h3><pre>{_e(json.dumps(schema, indent=2))}</pre>'
        for name, schema in document.get("components", {}).get("schemas", {}).items()
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(info['title'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(info['title'])}</h1><p>Version {_e(info['version'])} · OpenAPI "
        f'{_e(document["openapi"])} · <a href="/openapi.json">/openapi.json</a></p>'
        f"<p>{_e(info.get('description', ''))}</p>"
        f"<nav><ul>{index}</ul></nav>"
        f"<h2>Operations</h2>{''.join(_operation_html(p, m, o) for p, m, o in operations)}"
        f"<h2>Schemas</h2>{schemas}"
        "</body></html>\n"
    )
