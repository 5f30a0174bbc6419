"""The service's published OpenAPI contract, made to match what it enforces: the error bodies each
operation may answer, the request limits from params.yaml (query length, batch size, proxy limits,
feedback plausibility), and text that must hold a visible character. Applied to the generated
spec by middleware.OpenAPIContract."""

from __future__ import annotations

from typing import Any

from mixllm.service.api_models import (
    FORWARDED_CHAT_FIELDS,
    FORWARDED_MESSAGE_FIELDS,
    LIMITS,
    MESSAGE_ROLES,
    ROUTABLE,
    SETTINGS,
)

# Every error body: {"error", "field"} from our handlers, {"error", "detail": [...]} from BentoML's
# validation, and [{"error"}] from BentoML's own 4xx exceptions (it wraps the object in a list).
# /v1/*: OpenAI's error shape (mixllm.service.middleware.OpenAIErrors), with the same "field" beside it.
OPENAI_ERROR_SCHEMA: dict[str, Any] = {"title": "OpenAIError", "type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "string", "nullable": True}}},
    "field": {"type": "string"}}}
ERROR_SCHEMA: dict[str, Any] = {"title": "Error", "anyOf": [
    {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"}, "field": {"type": "string"},
        "detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}},
    {"type": "array", "items": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}},
]}
# Statuses any operation may answer besides its own: the middleware's (401 token, 408 stalled body,
# 413 size, 415 form body, 429 rate), a reused request_id (409), not ready or a busy store (503).
ERROR_STATUSES = {"400": "Bad Request", "401": "Unauthorized", "404": "Not Found", "408": "Request Timeout",
                  "409": "Conflict", "413": "Payload Too Large", "415": "Unsupported Media Type",
                  "429": "Too Many Requests", "500": "Internal Server Error", "502": "Bad Gateway",
                  "503": "Service Unavailable", "504": "Gateway Timeout"}
def _blank_characters() -> str:
    """A regex character class of every character schemas.is_blank treats as blank (white space
    and Unicode format characters, category Cf), built from the same unicodedata as that check."""
    import unicodedata

    # The basic plane only: JSON-schema (ECMA-262) patterns have no escape for the astral planes'
    # few format characters (tag characters, musical symbols' controls), which stay a known gap.
    blank = [c for c in range(0x10000) if chr(c).isspace() or unicodedata.category(chr(c)) == "Cf"]
    ranges, begin = [], blank[0]
    for previous, code in zip(blank, blank[1:] + [-1]):
        if code != previous + 1:
            ranges.append((begin, previous))
            begin = code

    def escape(code: int) -> str:
        return f"\\u{code:04x}"

    return "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges)


# Some character that is not blank: what the query check asks for, as a JSON-schema pattern.
VISIBLE_TEXT = f"[^{_blank_characters()}]"


def openapi_contract(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's generated OpenAPI document, corrected to what the service really accepts and sends
    (so schemathesis' contract checks hold): the error bodies and statuses, the response field
    `lambda` (BentoML documents the batch response by attribute name, `lambda_`), optional fields
    that may be null (BentoML drops the null), the rules the request models check in code (one of
    quality/thumbs, decision_id or query + llm, the served LLM names, the plausibility limits,
    visible query text), and the proxy's allowed fields."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["OpenAIError"] = OPENAI_ERROR_SCHEMA
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas[name] = ERROR_SCHEMA
    response = schemas.get("RouteResponse", {})
    if "lambda_" in response.get("properties", {}):
        response["properties"]["lambda"] = response["properties"].pop("lambda_")
        response["required"] = ["lambda" if r == "lambda_" else r for r in response.get("required", [])]
    rules = {"/route": _route_request_rules, "/feedback": _feedback_rules}
    if "RouteRequest" in schemas:
        _route_request_rules(schemas["RouteRequest"])
    if "ChatRequest" in schemas:
        _chat_rules(schemas["ChatRequest"])
    if "ChatMessage" in schemas:
        _message_rules(schemas["ChatMessage"])
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            body = operation.get("requestBody")
            if body is not None:
                schema = body.get("content", {}).get("application/json", {}).get("schema", {})
                # Every POST needs its JSON body (400 without one), except one declared optional
                # (POST /admin/circuits/close: no body closes every breaker).
                if {"type": "null"} not in schema.get("anyOf", []):
                    body["required"] = True
                if path in rules and "$ref" not in schema:
                    rules[path](schema)
            responses = operation["responses"]
            responses.pop("422", None)  # FastAPI's; our handler answers validation errors with 400
            schema_name = "OpenAIError" if path.startswith("/v1/") else "Error"
            for status, description in ERROR_STATUSES.items():
                responses.setdefault(status, {"description": description, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}})
            if path.startswith("/v1/"):  # FastAPI documented its own errors with the other shape
                for status, response in responses.items():
                    content = response.get("content", {}).get("application/json", {})
                    if status[0] in "45" and content.get("schema", {}).get("$ref", "").endswith("/Error"):
                        content["schema"] = {"$ref": "#/components/schemas/OpenAIError"}
    return spec


def _nullable(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Marks each optional property (default null) nullable, as OpenAPI 3.0 says it; returns the
    properties by name."""
    properties = schema.get("properties", {})
    for prop in properties.values():
        if "default" in prop and prop["default"] is None and "anyOf" not in prop:
            prop["nullable"] = True
    return properties


def _route_request_rules(schema: dict[str, Any]) -> None:
    typed = _nullable(schema)
    if "query" in typed:
        typed["query"].update({"maxLength": SETTINGS.max_query_chars, "pattern": VISIBLE_TEXT})
    if ROUTABLE.enabled is not None and "candidates" in typed:
        typed["candidates"]["items"] = {"type": "string", "enum": list(ROUTABLE.enabled)}


def _feedback_rules(schema: dict[str, Any]) -> None:
    typed = _nullable(schema)
    bounds = {"cost_usd": LIMITS.max_cost_usd, "latency_s": LIMITS.max_latency_s,
              "input_tokens": LIMITS.max_tokens, "output_tokens": LIMITS.max_tokens}
    for name, bound in bounds.items():
        if name in typed:
            typed[name]["maximum"] = bound
    if "query" in typed:
        typed["query"].update({"maxLength": SETTINGS.max_query_chars, "pattern": VISIBLE_TEXT})
    if ROUTABLE.known is not None and "llm" in typed:
        typed["llm"]["enum"] = list(ROUTABLE.known)
    # OpenAPI 3.0 has no null type and no const: "absent or null" is "not a <type>".
    def given(name: str, kind: str) -> dict[str, Any]:
        return {"required": [name], "properties": {name: {"type": kind}}}

    schema["allOf"] = [
        # exactly one of quality and thumbs
        {"anyOf": [{**given("quality", "number"), "not": given("thumbs", "boolean")},
                   {**given("thumbs", "boolean"), "not": given("quality", "number")}]},
        # binary feedback is 0 or 1
        {"anyOf": [{"not": {"required": ["kind"], "properties": {"kind": {"type": "string", "enum": ["binary"]}}}},
                   {"not": given("quality", "number")}, {"properties": {"quality": {"enum": [0, 1]}}}]},
        # a decision to attach it to, or the interaction itself
        {"anyOf": [given("decision_id", "string"),
                   {"required": ["query", "llm"], "properties": {"query": {"type": "string"}, "llm": {"type": "string"}}}]},
    ]


def _chat_rules(schema: dict[str, Any]) -> None:
    properties = schema.setdefault("properties", {})
    for name in sorted(FORWARDED_CHAT_FIELDS):
        properties.setdefault(name, {})
    properties["metadata"] = {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True}
    properties["candidates"] = {"type": "array", "items": {"type": "string"}, "minItems": 1, "nullable": True}
    properties["n"] = {"type": "integer", "minimum": 1, "maximum": SETTINGS.proxy_max_n, "nullable": True}
    for name in ("max_tokens", "max_completion_tokens"):
        properties[name] = {"type": "integer", "minimum": 1, "maximum": SETTINGS.proxy_max_tokens, "nullable": True}
    schema["additionalProperties"] = False


def _message_rules(schema: dict[str, Any]) -> None:
    properties = schema.setdefault("properties", {})
    for name in sorted(FORWARDED_MESSAGE_FIELDS):
        properties.setdefault(name, {})
    properties["role"] = {"type": "string", "enum": sorted(MESSAGE_ROLES)}
    schema["additionalProperties"] = False
