"""Prometheus metrics: the figures of /api/status, read when scraped, plus request latency.

A custom collector on a private registry turns one status snapshot (the same dict that
/api/status serves) into metric families at every scrape, so the two always agree. The
only state kept in memory is the latency histogram, fed by delivery after every POST.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)

# (status key under "packets", metric name, help); all persistent counters in the store.
PACKET_COUNTERS = (
    ("received", "gateway_packets_stored", "Distinct packets committed to the store."),
    ("redelivered", "gateway_packets_redelivered", "Broker redeliveries recognised as such."),
    ("delivered", "gateway_packets_delivered", "Packets accepted by a webhook."),
    ("dead", "gateway_packets_dead_lettered", "Packets moved to the dead-letter table."),
    ("too_large", "gateway_packets_too_large", "Packets over mqtt.max_payload_bytes."),
    ("dropped", "gateway_packets_dropped", "Packets evicted by on_full = drop_oldest."),
    (
        "decode_failed",
        "gateway_packets_decode_failed",
        "Payloads sent as base64 after failing to decode.",
    ),
)

# (status key of a webhook row, metric name, kind, help).
WEBHOOK_FIGURES = (
    ("hits", "gateway_webhook_hits", "counter", "Records matched by the webhook's route."),
    ("delivered", "gateway_webhook_delivered", "counter", "Records accepted by the receiver."),
    ("retried", "gateway_webhook_retried", "counter", "Failed requests scheduled for a retry."),
    ("redirects", "gateway_webhook_redirects", "counter", "307/308 redirects followed."),
    ("queue_depth", "gateway_webhook_queue_depth", "gauge", "Records waiting or in flight."),
    ("in_flight", "gateway_webhook_in_flight", "gauge", "Records in open batches."),
    (
        "oldest_pending_s",
        "gateway_webhook_oldest_pending_seconds",
        "gauge",
        "Age of the oldest record not yet delivered (0: nothing pending).",
    ),
    ("dead_letters", "gateway_webhook_dead_letters", "gauge", "Rows in the dead-letter table."),
    (
        "dead_lettered",
        "gateway_webhook_dead_lettered_records",
        "gauge",
        "Records dead-lettered and not replayed (a replay lowers it).",
    ),
)


def _timestamp(iso: str) -> float | None:
    if not iso:
        return None
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _gauge(name: str, doc: str, value: float | None, **labels: str) -> Iterator[Metric]:
    if value is None:
        return
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), float(value))
    yield g


def families(s: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one /api/status document."""
    gw = s["gateway"]
    yield from _gauge("gateway_build_info", "Gateway version.", 1, version=gw["version"])
    yield from _gauge("gateway_start_time_seconds", "Process start, Unix time.", gw["started_s"])
    yield from _gauge(
        "gateway_uptime_seconds", "Seconds since the gateway started.", gw["uptime_s"]
    )

    mqtt = gw["mqtt"]
    c = CounterMetricFamily(
        "gateway_packets_received",
        "Packets the broker handed over since start, redeliveries and oversized ones included.",
    )
    c.add_metric([], mqtt["received"])
    yield c
    c = CounterMetricFamily(
        "gateway_packets_acknowledged", "PUBACKs sent after commit, since start."
    )
    c.add_metric([], mqtt["acknowledged"])
    yield c
    c = CounterMetricFamily(
        "gateway_packets_bad_topic",
        "Packets whose topic was not valid UTF-8 (stored with U+FFFD), since start.",
    )
    c.add_metric([], mqtt.get("bad_topics", 0))
    yield c
    yield from _gauge(
        "gateway_mqtt_connected", "1 while connected to the broker.", mqtt["connected"]
    )
    for key, name, doc in PACKET_COUNTERS:
        c = CounterMetricFamily(name, doc)
        c.add_metric([], s["packets"][key])
        yield c
    yield from _gauge(
        "gateway_packets_pending", "Packets stored and not yet finished.", s["packets"]["pending"]
    )
    yield from _gauge("gateway_buffer_bytes", "Payload bytes stored.", s["buffer"]["bytes"])
    yield from _gauge(
        "gateway_buffer_max_bytes", "gateway.max_buffer_mb in bytes.", s["buffer"]["max_bytes"]
    )
    yield from _gauge("gateway_dead_letters", "Rows in the dead-letter table.", s["dead_letters"])
    c = CounterMetricFamily(
        "gateway_records_rejected",
        "Records dead-lettered on their own (too large, filter or format failed, damaged).",
        labels=["reason"],
    )
    for reason, n in s["rejected"].items():
        c.add_metric([reason], n)
    yield c
    yield from _gauge(
        "gateway_dead_letter_bytes",
        "Bytes dead letters hold; they count toward gateway.max_buffer_mb.",
        s["buffer"]["dead_letter_bytes"],
    )
    yield from _tables(s)
    c = CounterMetricFamily(
        "gateway_dead_letters_evicted",
        "Oldest dead letters deleted past gateway.dead_letter_max_mb or dead_letter_max_age.",
    )
    c.add_metric([], s["dead_letters_evicted"])
    yield c
    store = gw["store"]
    yield from _gauge("gateway_store_bytes", "Store files on disk (db, WAL).", store["bytes"])
    yield from _gauge("gateway_store_writable", "0 while writes fail.", store["writable"])
    yield from _gauge(
        "gateway_store_broker_cap",
        "Packets the broker sends ahead of their PUBACKs, as learnt (0: no cap seen).",
        store["broker_cap"],
    )
    yield from _gauge(
        "gateway_store_trickle_cap",
        "Packets a broker sends ahead of their PUBACKs, below a trickle's stretched commit"
        " delay, as learnt (0: none seen).",
        store["trickle_cap"],
    )
    c = CounterMetricFamily(
        "gateway_store_commits", "Store transactions that wrote (each an fsync), since start."
    )
    c.add_metric([], store["commits"])
    yield c

    yield from _webhooks(s["webhooks"])
    yield from _modem(s.get("modem"))
    yield from _data_budget(s.get("data_budget"))
    c = CounterMetricFamily("gateway_cdrs_emitted", "Usage CDRs built (rows in the cdrs table).")
    c.add_metric([], s["cdrs"]["count"])
    yield c


def _tables(s: dict[str, Any]) -> Iterator[Metric]:
    """Each table that counts toward max_buffer_mb, and what retention deleted."""
    yield from _gauge(
        "gateway_retained_bytes",
        "Bytes CDRs, events, modem snapshots and reports hold; they count toward"
        " gateway.max_buffer_mb.",
        s["buffer"]["retained_bytes"],
    )
    rows = GaugeMetricFamily("gateway_table_rows", "Rows of a stored table.", labels=["table"])
    size = GaugeMetricFamily(
        "gateway_table_bytes", "Bytes a table counts toward max_buffer_mb.", labels=["table"]
    )
    for name, t in s["tables"].items():
        rows.add_metric([name], t["rows"])
        size.add_metric([name], t["bytes"])
    yield rows
    yield size
    pruned = CounterMetricFamily(
        "gateway_retention_pruned",
        "Rows deleted past gateway.retention_days, by table.",
        labels=["table"],
    )
    for name, n in s["retention"]["pruned"].items():
        pruned.add_metric([name], n)
    yield pruned


def _webhooks(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    names = [r["name"] for r in rows]
    for key, name, kind, doc in WEBHOOK_FIGURES:
        fam: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            fam = CounterMetricFamily(name, doc, labels=["webhook"])
        else:
            fam = GaugeMetricFamily(name, doc, labels=["webhook"])
        for r in rows:
            fam.add_metric([r["name"]], r[key])
        yield fam
    req = CounterMetricFamily(
        "gateway_webhook_requests",
        "Requests by result (failed: any non-2xx or no response).",
        labels=["webhook", "result"],
    )
    for r in rows:
        req.add_metric([r["name"], "ok"], r["requests_ok"])
        req.add_metric([r["name"], "failed"], r["requests_failed"])
    yield req
    disabled = GaugeMetricFamily(
        "gateway_webhook_disabled", "1 when a 410 Gone disabled the webhook.", labels=["webhook"]
    )
    success = GaugeMetricFamily(
        "gateway_webhook_last_success_timestamp_seconds",
        "Unix time of the last accepted request.",
        labels=["webhook"],
    )
    for r in rows:
        disabled.add_metric([r["name"]], int(r["disabled"]))
        ts = _timestamp(r["last_success"])
        if ts is not None:
            success.add_metric([r["name"]], ts)
    yield disabled
    if names:
        yield success


def _modem(m: dict[str, Any] | None) -> Iterator[Metric]:
    if not m or not m.get("configured"):
        return
    info = m.get("info") or {}
    yield from _gauge(
        "gateway_modem_up", "1 while the modem answers with a usable SIM.", m["state"] == "ok"
    )
    yield from _gauge(
        "gateway_modem_info",
        "Modem identity (value 1).",
        1,
        vendor=str(info.get("vendor") or ""),
        model=str(info.get("model") or ""),
        operator=str(info.get("operator") or ""),
        mcc=str(info.get("mcc") or ""),
        mnc=str(info.get("mnc") or ""),
    )
    yield from _gauge("gateway_modem_signal_dbm", "Signal strength (dBm).", info.get("signal_dbm"))
    yield from _gauge("gateway_modem_signal_csq", "AT+CSQ rssi (0-31).", info.get("csq"))
    yield from _radio(info)
    registered = info.get("registration") in ("home", "roaming")
    yield from _gauge("gateway_modem_registered", "1 while registered.", registered)
    for key, name, doc in (
        ("tx_bytes", "gateway_modem_transmit_bytes", "The modem's transmit counter."),
        ("rx_bytes", "gateway_modem_receive_bytes", "The modem's receive counter."),
    ):
        if info.get(key) is not None:
            c = CounterMetricFamily(name, doc + " It restarts at a modem reset.")
            c.add_metric([], info[key])
            yield c
    yield from _gauge(
        "gateway_modem_bytes_today", "Bytes (tx + rx) since local midnight.", m.get("bytes_today")
    )
    rec = m.get("recovery")
    if rec:
        c = CounterMetricFamily(
            "gateway_modem_recoveries",
            "Recovery ladder steps taken (manual ones too), by step.",
            labels=["step"],
        )
        for step, n in rec["totals"].items():
            c.add_metric([step], n)
        yield c
        yield from _gauge(
            "gateway_modem_recovery_resets_last_hour",
            "Radio cycles and resets in the last hour (modem.recovery.max_resets_per_hour).",
            rec["resets_last_hour"],
        )


# (modem info key, metric name, help) of the radio levels; no sample while unknown.
RADIO_GAUGES = (
    ("rsrp_dbm", "gateway_modem_rsrp_dbm", "LTE reference signal received power (dBm)."),
    ("rsrq_db", "gateway_modem_rsrq_db", "LTE reference signal received quality (dB)."),
    ("sinr_db", "gateway_modem_sinr_db", "LTE signal to interference and noise ratio (dB)."),
    ("rscp_dbm", "gateway_modem_rscp_dbm", "UMTS received signal code power (dBm)."),
    ("ecno_db", "gateway_modem_ecno_db", "UMTS Ec/No (dB)."),
)


def _radio(info: dict[str, Any]) -> Iterator[Metric]:
    for key, name, doc in RADIO_GAUGES:
        value = info.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield from _gauge(name, doc, value)
    tech = info.get("access_technology")
    if isinstance(tech, str) and tech:
        yield from _gauge(
            "gateway_modem_access_technology",
            "The radio access technology in use (value 1).",
            1,
            technology=tech,
        )


def _data_budget(d: dict[str, Any] | None) -> Iterator[Metric]:
    if not d:
        return
    yield from _gauge(
        "gateway_data_cycle_used_bytes",
        "Modem bytes (tx + rx) counted in the current billing cycle.",
        d["used_bytes"],
    )
    yield from _gauge(
        "gateway_data_budget_bytes",
        "modem.data_budget_mb in bytes (absent: no budget).",
        d["budget_bytes"],
    )
    yield from _gauge(
        "gateway_data_cycle_start_timestamp_seconds",
        "Start of the current billing cycle, Unix time.",
        _timestamp(d["cycle_start"]),
    )
    yield from _gauge(
        "gateway_data_cycle_end_timestamp_seconds",
        "End of the current billing cycle (start of the next), Unix time.",
        _timestamp(d["cycle_end"]),
    )


class _StatusCollector:
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: registering must not read the store.
        return ()

    def collect(self) -> Iterable[Metric]:
        return families(self.read())


class Metrics:
    """A private registry: the status collector and a latency histogram per webhook."""

    def __init__(self, read: Callable[[], dict[str, Any]], webhooks: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatusCollector(read))
        self.latency = Histogram(
            "gateway_webhook_request_duration_seconds",
            "Time from sending a webhook request to its answer (or to giving up on it).",
            ["webhook"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.add_webhooks(webhooks)

    def add_webhooks(self, webhooks: Iterable[str]) -> None:
        """Start each webhook's latency histogram at zero (a reload may add some)."""
        for name in webhooks:
            self.latency.labels(name)

    def observe(self, webhook: str, seconds: float) -> None:
        """Record one request's latency."""
        self.latency.labels(webhook).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format; reads the store (call it off the event loop)."""
        return bytes(generate_latest(self.registry))
