"""URL templates (channel_proc.templates): what renders, how values are quoted, what is refused."""

from __future__ import annotations

import pytest

from channel_proc.templates import (
    FIELDS,
    TemplateError,
    check_template,
    is_template,
    placeholders,
    render,
)

VALUES = {
    "message_id": "b2f1",
    "channel_id": "ch-1",
    "event_type": "delivery_succeeded",
    "from": "+27 82/1?x=1&y",
    "to": "*120*8#",
    "session_event": "new",
    "status": "down",
    "component": "telnet",
}


def test_fields_are_the_contract_placeholders() -> None:
    assert sorted(FIELDS) == sorted(VALUES)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("http://h/mo", "http://h/mo", id="plain"),
        pytest.param("http://h/{message_id}", "http://h/b2f1", id="path"),
        pytest.param(
            "http://h/?from={from}&to={to}",
            "http://h/?from=%2B27%2082%2F1%3Fx%3D1%26y&to=%2A120%2A8%23",
            id="reserved-characters-quoted",
        ),
        pytest.param(
            "http://h/{channel_id}/{event_type}/{session_event}/{status}/{component}",
            "http://h/ch-1/delivery_succeeded/new/down/telnet",
            id="every-field",
        ),
        pytest.param("http://h/{{literal}}/{to}", "http://h/{literal}/%2A120%2A8%23", id="escapes"),
        pytest.param("http://h/{message_id}{message_id}", "http://h/b2f1b2f1", id="repeated"),
    ],
)
def test_render(template: str, expected: str) -> None:
    check_template(template)
    assert render(template, VALUES) == expected


def test_missing_or_none_values_render_empty() -> None:
    assert render("http://h/{to}?e={event_type}&m={message_id}", {"to": None}) == "http://h/?e=&m="


def test_non_string_values_are_quoted_text() -> None:
    assert render("http://h/{status}", {"status": 404}) == "http://h/404"


def test_unicode_is_utf8_percent_encoded() -> None:
    assert render("http://h/{to}", {"to": "é"}) == "http://h/%C3%A9"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        pytest.param("http://h/{message_id", "bad template syntax", id="unclosed"),
        pytest.param("http://h/}", "bad template syntax", id="single-close"),
        pytest.param("http://h/{}", "must be named", id="positional"),
        pytest.param("http://h/{0}", "must be named", id="numbered"),
        pytest.param("http://h/{msisdn}", r"unknown placeholder \{msisdn\}", id="unknown"),
        pytest.param("http://h/{to.real}", "unknown placeholder", id="attribute"),
        pytest.param("http://h/{to[0]}", "unknown placeholder", id="index"),
        pytest.param("http://h/{to!x}", "unknown conversion", id="conversion"),
        pytest.param("http://h/{to:{from}}", "nested placeholder", id="nested"),
    ],
)
def test_invalid_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        check_template(template)
    with pytest.raises(TemplateError, match=message):
        render(template, VALUES)


def test_a_value_that_does_not_fit_its_spec_fails_at_render() -> None:
    check_template("http://h/{to:d}")
    with pytest.raises(TemplateError, match="cannot render"):
        render("http://h/{to:d}", VALUES)


def test_placeholders_and_is_template() -> None:
    assert placeholders("http://h/{to}/{message_id}?x={to}") == ["to", "message_id", "to"]
    assert placeholders("http://h/{{x}}") == []
    assert is_template("http://h/{{x}}")
    assert not is_template("http://u:p@h:80/a?b=c%7B")
