"""The OpenAPI 3 document of /api/* (hand-written; tests fuzz the server against it)."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.web.schemas import (
    CDR,
    DEAD_LETTER,
    ERROR,
    NULLABLE_INT,
    STATUS,
)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_UNAUTHORIZED = _json(ERROR, "missing or wrong token (only when web.token is set)")
_MISDIRECTED = _json(ERROR, "the Host header names neither this gateway nor web.allowed_hosts")
# What every POST may also answer: the guard takes only JSON bodies, read in time.
_POST_REFUSALS = {
    "403": _json(ERROR, "a form post without the login form's csrf field"),
    "408": _json(ERROR, "the request body did not arrive within web.read_timeout_s"),
    "415": _json(ERROR, "the body must be application/json"),
    "421": _MISDIRECTED,
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at /api/openapi.json."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-gateway API",
            "version": __version__,
            "description": "Status, dead letters, CDRs and webhook tests of one gateway. With"
            " web.token set, send `Authorization: Bearer <token>` (or the login cookie)."
            " Every POST takes a JSON body (Content-Type: application/json), whatever the"
            " token; a Host header that names another site is answered 421.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/status": {
                "get": {
                    "operationId": "status",
                    "summary": "Everything the dashboard shows",
                    "responses": {
                        "200": _json(STATUS, "status"),
                        "401": _UNAUTHORIZED,
                        "421": _MISDIRECTED,
                    },
                }
            },
            "/api/dead-letters": {
                "get": {
                    "operationId": "listDeadLetters",
                    "summary": "Dead letters, newest first, without their bodies",
                    "parameters": [
                        {
                            "name": "webhook",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["dead_letters"],
                                "properties": {
                                    "dead_letters": {"type": "array", "items": DEAD_LETTER}
                                },
                            },
                            "dead letters",
                        ),
                        "400": _json(ERROR, "bad query parameter"),
                        "401": _UNAUTHORIZED,
                        "421": _MISDIRECTED,
                    },
                },
                "post": {
                    "operationId": "replayDeadLetters",
                    "summary": "Re-queue a webhook's dead letters (all, or the given ids)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["webhook"],
                                    "properties": {
                                        "webhook": {"type": "string"},
                                        "ids": {
                                            "type": "array",
                                            "items": {
                                                "type": "integer",
                                                "minimum": 1,
                                                "maximum": 2**63 - 1,
                                            },
                                            "maxItems": 10000,
                                        },
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["replayed"],
                                "properties": {"replayed": {"type": "integer"}},
                            },
                            "how many dead letters were re-queued",
                        ),
                        "400": _json(ERROR, "bad request body"),
                        "401": _UNAUTHORIZED,
                        "404": _json(ERROR, "no such webhook in the configuration"),
                        **_POST_REFUSALS,
                    },
                },
            },
            "/api/webhooks/{name}/test": {
                "post": {
                    "operationId": "testWebhook",
                    "summary": "Send one test request in the webhook's format; the outcome",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "description": "ignored; JSON only so that no cross-site form can post",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["webhook", "webhook_id", "ok", "status", "latency_ms"],
                                "properties": {
                                    "webhook": {"type": "string"},
                                    "webhook_id": {"type": "string"},
                                    "ok": {"type": "boolean"},
                                    "status": NULLABLE_INT,
                                    "latency_ms": {"type": "number"},
                                    "excerpt": {"type": "string"},
                                    "error": {"type": "string"},
                                },
                            },
                            "the outcome (also when the receiver failed)",
                        ),
                        "401": _UNAUTHORIZED,
                        "404": _json(ERROR, "no such webhook in the configuration"),
                        **_POST_REFUSALS,
                    },
                }
            },
            "/api/cdrs": {
                "get": {
                    "operationId": "listCdrs",
                    "summary": "CDRs oldest first, a page at a time, with their delivery state",
                    "parameters": [
                        _query(
                            "since",
                            {
                                "anyOf": [
                                    {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
                                    {"type": "string", "format": "date"},
                                ]
                            },
                            "Timestamp at or after: epoch ms or an ISO 8601 date (a date-time"
                            " such as 2026-03-01T12:00:00Z is taken too; UTC unless it says)",
                        ),
                        _query(
                            "iccid",
                            {"type": "string", "pattern": "^[0-9A-Fa-f]{1,22}$"},
                            "only this SIM's CDRs",
                        ),
                        _query(
                            "after",
                            {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                            "the previous page's next_after",
                        ),
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": 1000},
                            "CDRs per page (100 unless given)",
                        ),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["cdrs", "next_after"],
                                "properties": {
                                    "cdrs": {"type": "array", "items": CDR},
                                    "next_after": {
                                        "type": ["integer", "null"],
                                        "description": "`after` for the next page; null: none",
                                    },
                                },
                            },
                            "a page of CDRs",
                        ),
                        "400": _json(ERROR, "bad query parameter"),
                        "401": _UNAUTHORIZED,
                        "421": _MISDIRECTED,
                    },
                }
            },
            "/api/cdrs/{unique_id}": {
                "get": {
                    "operationId": "getCdr",
                    "summary": "One CDR by its UniqueID, with its delivery state per webhook",
                    "parameters": [
                        {
                            "name": "unique_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(CDR, "the CDR"),
                        "401": _UNAUTHORIZED,
                        "404": _json(ERROR, "no CDR with that UniqueID"),
                        "421": _MISDIRECTED,
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": _json({"type": "object"}, "OpenAPI 3.1"),
                        "401": _UNAUTHORIZED,
                        "421": _MISDIRECTED,
                    },
                }
            },
        },
    }
