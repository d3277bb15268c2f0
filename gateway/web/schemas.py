"""The JSON schemas of the local API's bodies, for the OpenAPI document (openapi.py).

They describe what gateway.web.status and the API handlers return; the tests check the
server against them.
"""

from __future__ import annotations

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}

NULLABLE_INT = {"type": ["integer", "null"]}

WEBHOOK_ROW = {
    "type": "object",
    "required": [
        "name",
        "source",
        "hits",
        "requests_ok",
        "requests_failed",
        "retried",
        "delivered",
        "dead_lettered",
        "dead_letters",
        "queue_depth",
        "in_flight",
        "last_hit",
        "last_success",
        "last_error_at",
        "last_error_status",
        "last_error",
        "disabled",
        "disabled_reason",
        "redirects",
        "oldest_pending_s",
    ],
    "properties": {
        "name": {"type": "string"},
        "source": {"type": "string"},
        "hits": {"type": "integer", "description": "records matched by the route"},
        "requests_ok": {"type": "integer"},
        "requests_failed": {"type": "integer"},
        "retried": {"type": "integer"},
        "delivered": {"type": "integer", "description": "records accepted"},
        "dead_lettered": {"type": "integer", "description": "records dead-lettered, not replayed"},
        "dead_letters": {"type": "integer", "description": "rows in the dead-letter table"},
        "queue_depth": {"type": "integer"},
        "in_flight": {"type": "integer"},
        "last_hit": {"type": "string", "description": "ISO 8601 UTC or empty"},
        "last_success": {"type": "string"},
        "last_error_at": {"type": "string"},
        "last_error_status": NULLABLE_INT,
        "last_error": {"type": "string", "description": "HTTP status and response excerpt"},
        "disabled": {"type": "boolean"},
        "disabled_reason": {"type": "string"},
        "redirects": {"type": "integer", "description": "307/308 redirects followed"},
        "oldest_pending_s": {
            "type": "number",
            "minimum": 0,
            "description": "age in seconds of the oldest record not yet delivered;"
            " 0 when nothing is pending",
        },
    },
}

TABLE_SIZE = {
    "type": "object",
    "required": ["rows", "bytes"],
    "properties": {"rows": {"type": "integer"}, "bytes": {"type": "integer"}},
}

RECOVERY = {
    "type": "object",
    "description": "the modem recovery ladder ([modem.recovery])",
    "required": ["state", "resets_last_hour", "last", "totals"],
    "properties": {
        "enabled": {"type": ["boolean", "null"]},
        "state": {"type": "string", "enum": ["idle", "recovering", "gave_up"]},
        "problem": {"type": "string", "description": "unregistered, unresponsive or ''"},
        "resume_at": {"type": ["number", "null"], "description": "gave up until (Unix s)"},
        "resets_last_hour": {"type": "integer"},
        "max_resets_per_hour": NULLABLE_INT,
        "last": {
            "type": ["object", "null"],
            "description": "the newest step: step, reason, attempt, at (Unix s), outcome",
        },
        "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}

STATUS = {
    "type": "object",
    "required": [
        "gateway",
        "packets",
        "buffer",
        "dead_letters",
        "dead_letters_evicted",
        "rejected",
        "webhooks",
        "modem",
        "cdrs",
        "reports",
        "rates",
        "throughput",
        "data_budget",
    ],
    "properties": {
        "gateway": {
            "type": "object",
            "required": ["version", "started", "started_s", "uptime_s", "store", "mqtt"],
            "properties": {
                "version": {"type": "string"},
                "started": {"type": "string"},
                "started_s": {"type": "number"},
                "uptime_s": {"type": "number"},
                "store": {
                    "type": "object",
                    "required": [
                        "bytes",
                        "writable",
                        "write_error",
                        "commits",
                        "broker_cap",
                        "trickle_cap",
                    ],
                    "properties": {
                        "bytes": {"type": "integer"},
                        "writable": {"type": "boolean"},
                        "write_error": {"type": "string"},
                        "commits": {"type": "integer"},
                        "broker_cap": {"type": "integer"},
                        "trickle_cap": {"type": "integer"},
                    },
                },
                "mqtt": {
                    "type": "object",
                    "required": [
                        "connected",
                        "subscribed",
                        "alive",
                        "received",
                        "acknowledged",
                        "last_error",
                    ],
                    "properties": {
                        "broker": {"type": "string"},
                        "connected": {"type": "boolean"},
                        "subscribed": {"type": "boolean"},
                        "alive": {"type": "boolean"},
                        "received": {"type": "integer"},
                        "acknowledged": {"type": "integer"},
                        "bad_topics": {
                            "type": "integer",
                            "description": "topics not valid UTF-8, stored with U+FFFD",
                        },
                        "last_packet": {"type": "string"},
                        "last_error": {"type": "string"},
                        "sessions": {
                            "type": "array",
                            "description": "each MQTT session (one per ingest process)",
                            "items": {
                                "type": "object",
                                "required": ["client_id", "pid", "connected", "last_error"],
                                "properties": {
                                    "client_id": {"type": "string"},
                                    "pid": {
                                        "type": "integer",
                                        "description": "0 while it is being restarted",
                                    },
                                    "connected": {"type": "boolean"},
                                    "subscribed": {"type": "boolean"},
                                    "received": {"type": "integer"},
                                    "acknowledged": {"type": "integer"},
                                    "last_error": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "packets": {
            "type": "object",
            "description": "as `gateway status --json`",
            "required": [
                "received",
                "redelivered",
                "pending",
                "delivered",
                "dead",
                "too_large",
                "dropped",
                "decode_failed",
            ],
            "additionalProperties": {"type": "integer"},
        },
        "buffer": {
            "type": "object",
            "required": ["bytes", "max_bytes", "dead_letter_bytes", "retained_bytes"],
            "properties": {
                "bytes": {"type": "integer"},
                "max_bytes": NULLABLE_INT,
                "dead_letter_bytes": {
                    "type": "integer",
                    "description": "what dead letters hold; part of max_bytes",
                },
                "retained_bytes": {
                    "type": "integer",
                    "description": "what CDRs, events, modem snapshots and reports hold;"
                    " part of max_bytes",
                },
            },
        },
        "tables": {
            "type": "object",
            "description": "rows and bytes of each table that counts toward max_bytes",
            "required": [
                "packets",
                "dead_letters",
                "cdrs",
                "events",
                "modem_snapshots",
                "reports",
            ],
            "additionalProperties": TABLE_SIZE,
        },
        "retention": {
            "type": "object",
            "required": ["days", "pruned"],
            "properties": {
                "days": {"type": ["number", "null"], "description": "gateway.retention_days"},
                "pruned": {
                    "type": "object",
                    "description": "rows deleted past retention_days, by table",
                    "additionalProperties": {"type": "integer"},
                },
            },
        },
        "dead_letters": {"type": "integer"},
        "dead_letters_evicted": {
            "type": "integer",
            "description": "oldest dead letters deleted past dead_letter_max_mb or _max_age",
        },
        "rejected": {
            "type": "object",
            "description": "records dead-lettered on their own, by reason, since the store began",
            "required": ["too_large", "unfilterable", "unencodable", "undecodable"],
            "additionalProperties": {"type": "integer"},
        },
        "webhooks": {"type": "array", "items": WEBHOOK_ROW},
        "modem": {
            "type": ["object", "null"],
            "required": ["configured", "state", "info", "bytes_today"],
            "properties": {
                "configured": {"type": "boolean"},
                "state": {"type": "string"},
                "updated": {"type": "string"},
                "last_error": {"type": "string"},
                "info": {
                    "type": ["object", "null"],
                    "description": "identity, counters and radio: access_technology (gsm, umts,"
                    " lte, lte-m, nb-iot, 5g-nr), rsrp_dbm, rsrq_db, sinr_db, rscp_dbm, ecno_db,"
                    " cell_id, tac, band, earfcn, pci; null when unknown",
                },
                "signal_quality": {
                    "type": ["string", "null"],
                    "enum": ["excellent", "good", "fair", "poor", None],
                    "description": "grade from RSRP and SINR (the worse of the two);"
                    " null without either",
                },
                "bytes_today": NULLABLE_INT,
                "recovery": RECOVERY,
            },
        },
        "data_budget": {
            "type": ["object", "null"],
            "description": "the billing cycle's modem data against modem.data_budget_mb;"
            " null without [modem]",
            "required": ["used_bytes", "budget_bytes", "percent", "cycle_start", "cycle_end"],
            "properties": {
                "used_bytes": {"type": "integer", "description": "tx + rx in this cycle"},
                "budget_bytes": {
                    "type": ["integer", "null"],
                    "description": "null: no data_budget_mb",
                },
                "percent": {
                    "type": ["number", "null"],
                    "description": "of the budget, rounded down to 0.1",
                },
                "cycle_start": {"type": "string", "description": "ISO 8601 UTC"},
                "cycle_end": {"type": "string", "description": "the next cycle's start"},
                "iccid": {"type": "string", "description": "the SIM counted"},
            },
        },
        "cdrs": {
            "type": "object",
            "required": ["count", "latest"],
            "properties": {
                "count": {"type": "integer"},
                "latest": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "unique_id", "ts_ms", "iccid", "usage", "data"],
                        "properties": {
                            "id": {"type": "integer"},
                            "unique_id": {"type": "string"},
                            "ts_ms": {"type": "integer"},
                            "time": {"type": "string"},
                            "iccid": {"type": "string"},
                            "usage": {"type": "integer"},
                            "data": {"type": "object"},
                        },
                    },
                },
            },
        },
        "reports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "file_name", "size", "lines", "valid_until", "expired"],
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "file_name": {"type": "string"},
                    "size": {"type": "integer"},
                    "lines": {"type": "integer"},
                    "created": {"type": "string"},
                    "valid_until": {"type": "string"},
                    "expired": {"type": "boolean"},
                    "error": {"type": "string"},
                },
            },
        },
        "rates": {
            "type": "object",
            "required": ["received_per_s", "delivered_per_s", "failures_per_min"],
            "additionalProperties": {"type": "number"},
        },
        "throughput": {
            "type": "object",
            "required": ["interval_s", "window_s", "points"],
            "properties": {
                "interval_s": {"type": "number"},
                "window_s": {"type": "number"},
                "points": {
                    "type": "array",
                    "description": "[unix time s, delivered packets/s, failed requests/min,"
                    " received packets/s]",
                    "items": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
    },
}

DEAD_LETTER = {
    "type": "object",
    "required": ["id", "webhook", "reason", "records", "created"],
    "properties": {
        "id": {"type": "integer"},
        "webhook": {"type": "string"},
        "source": {"type": "string"},
        "webhook_id": {"type": "string"},
        "records": {"type": "integer"},
        "reason": {"type": "string"},
        "status": NULLABLE_INT,
        "excerpt": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "created_ns": {"type": "integer"},
        "created": {"type": "string"},
        "topic": {"type": ["string", "null"]},
        "iccid": {"type": ["string", "null"]},
        "bytes": NULLABLE_INT,
        "size": {
            "type": ["integer", "null"],
            "description": "a too_large packet's payload size (its letter keeps a prefix)",
        },
        "sha256": {"type": ["string", "null"], "description": "a too_large payload's SHA-256"},
    },
}


CDR_DELIVERY = {
    "type": "object",
    "required": ["webhook", "state"],
    "properties": {
        "webhook": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "delivered", "dead_lettered", "filtered"]},
        "webhook_id": {"type": "string", "description": "the open batch holding it (pending)"},
        "attempts": {"type": "integer", "description": "failed attempts so far (pending)"},
        "dead_letter_id": {"type": "integer", "description": "the dead letter holding it"},
        "reason": {"type": "string", "description": "why it was dead-lettered"},
    },
}

CDR = {
    "type": "object",
    "required": ["id", "unique_id", "ts_ms", "time", "iccid", "usage", "cdr", "delivery"],
    "properties": {
        "id": {"type": "integer"},
        "unique_id": {"type": "string"},
        "ts_ms": {"type": "integer"},
        "time": {"type": "string", "description": "the CDR's Timestamp, ISO 8601 UTC"},
        "iccid": {"type": "string"},
        "usage": {"type": "integer"},
        "cdr": {
            "type": ["object", "null"],
            "description": "the Monogoto DATA CDR; null when its stored JSON is damaged",
        },
        "delivery": {
            "type": "array",
            "description": "one entry per webhook with source = 'cdrs'",
            "items": CDR_DELIVERY,
        },
    },
}
