"""The daemon's OpenAPI description (served at /openapi.json, used by the API fuzz test)."""

from __future__ import annotations

from typing import Any

_KEYS = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "16-byte chunk keys"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_AGO = {"type": "number", "minimum": 0, "maximum": 86399}


def _control(summary: str, props: dict[str, Any], result: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/msgpack": {
            "schema": {"type": "object", "properties": props, "required": required}}}},
        "responses": {"200": {"description": "ok", "content": {"application/msgpack": {"schema": {
            "type": "object", "properties": result}}}},
            "400": {"description": "malformed request"}, "401": {"description": "missing or wrong API key"},
            "413": {"description": "body too large"}},
    }}


def openapi() -> dict[str, Any]:
    ttl = {"type": "number", "exclusiveMinimum": 0}
    paths: dict[str, Any] = {
        "/v1/exists": _control("Which keys are stored", {"keys": _KEYS}, {"present": {"type": "array"}}, ["keys"]),
        "/v1/lookup": _control("How many leading keys are stored", {"keys": _KEYS}, {"hits": {"type": "integer"}},
                               ["keys"]),
        "/v1/pin": _control("Protect stored keys from eviction for ttl_s seconds", {"keys": _KEYS, "ttl_s": ttl},
                            {"pinned": {"type": "integer"}}, ["keys", "ttl_s"]),
        "/v1/unpin": _control("Release pins", {"keys": _KEYS}, {"unpinned": {"type": "integer"}}, ["keys"]),
        "/v1/delete": _control("Delete keys", {"keys": _KEYS}, {"deleted": {"type": "integer"}}, ["keys"]),
        "/v1/tool/started": _control(
            "An agent session paused on a tool call: pin its keys for the TTL learned from the tenant's "
            "calls of that tool; ago_s says how long ago the call started",
            {"session": _NAME, "tool": _NAME, "keys": _KEYS, "ago_s": _AGO}, {"ttl_s": {"type": "number"}},
            ["session", "tool"]),
        "/v1/tool/finished": _control(
            "The session's next turn: learn the tool's duration, release the pins",
            {"session": _NAME, "ago_s": _AGO}, {"took_s": {"type": "number", "nullable": True}}, ["session"]),
        "/v1/clear": _control("Delete everything, or one tenant's objects (admin)", {"tenant": {"type": "string"}},
                              {"cleared": {"type": "boolean"}, "deleted": {"type": "integer"}}, []),
        "/v1/get": {"post": {
            "summary": "Fetch objects: a batch body (u32 header length, msgpack header, raw objects)",
            "requestBody": {"required": True, "content": {"application/msgpack": {
                "schema": {"type": "object", "properties": {"keys": _KEYS}, "required": ["keys"]}}}},
            "responses": {"200": {"description": "batch", "content": {"application/x-kvstore-batch": {}}},
                          "400": {"description": "malformed request"}, "401": {"description": "unauthorized"}}}},
        "/v1/put": {"post": {
            "summary": "Store self-describing kvstore objects given as a batch body",
            "requestBody": {"required": True, "content": {"application/x-kvstore-batch": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "stored count"}, "400": {"description": "malformed or corrupt object"},
                          "401": {"description": "unauthorized"}, "403": {"description": "tenant quota exceeded"},
                          "413": {"description": "body too large"}}}},
        "/v1/stats": {"get": {"summary": "Admin: counters per tier and every tenant's usage; a tenant: its own usage",
                              "responses": {"200": {"description": "JSON stats"}}}},
        "/healthz": {"get": {"summary": "Process is up", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {"get": {"summary": "Store is open and accepting requests",
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (admin key, or the --metrics-port listener)",
                             "responses": {"200": {"description": "text format"}, "403": {"description": "not admin"}}}},
    }
    return {"openapi": "3.0.3", "info": {"title": "kvstore daemon", "version": "1"},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}], "paths": paths}
