"""The configuration as frozen dataclasses, one per TOML section, with their defaults."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SOURCES = ("packets", "cdrs", "reports", "events")
FORMATS = ("monoz", "monogoto", "envelope", "flat", "report")
PAYLOAD_ENCODINGS = ("auto", "utf8", "base64", "hex", "cbor-json")
OPS = ("==", "!=", ">", ">=", "<", "<=", "contains", "startswith", "regex", "in")
# The field order of a Monogoto DATA CDR (the CSV columns of a report); report filters
# name these, so the configuration knows them. The numeric ones are integers.
CDR_FIELDS = (
    "CdrType",
    "UniqueID",
    "Iccid",
    "IMSI",
    "MSISDN",
    "IMEI",
    "MNO",
    "MnoName",
    "MCC",
    "MNC",
    "ThingName",
    "ThingId",
    "ThingsGroupId",
    "ThingsGroupName",
    "Timestamp",
    "Usage",
    "APN",
)
CDR_NUMBER_FIELDS = ("Timestamp", "Usage")
REPORT_DELIVERIES = ("link", "push")
REPORT_PERIODS = ("since_last", "previous_day", "previous_month")


@dataclass(frozen=True, slots=True)
class GatewaySection:
    state_dir: Path = Path("/var/lib/edge-gateway")
    max_buffer_mb: float = 512.0
    on_full: str = "backpressure"
    commit_max_packets: int = 2000
    commit_delay_ms: float | None = None  # None: "auto" (see store.commit_delay_ms)
    log_level: str = "info"
    log_format: str = "text"
    min_free_mb: float = 64.0
    # Dead letters count toward max_buffer_mb; the oldest go past either limit. Left
    # out, the size limit is 64 MB, or a quarter of a max_buffer_mb not above that.
    dead_letter_max_mb: float = 64.0
    dead_letter_max_age: float = 30 * 86400.0  # seconds; 0: no age limit
    # CDRs, events, modem snapshots and reports older than this are deleted, unless a
    # webhook or report has not taken them yet (see store.retention).
    retention_days: float = 35.0
    # Seconds between gateway_heartbeat events; 0: none (see runtime.heartbeat).
    heartbeat_s: float = 0.0
    # At most one event of each kind of a pair (broker_disconnected/_connected,
    # webhook_failing/_recovered) per this many seconds (see runtime.alerts).
    flap_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str
    port: int = 1883
    client_id: str = "edge-gateway"
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    topics: tuple[str, ...] = ("devices/+/up",)
    qos: int = 1
    shared_group: str = ""
    iccid_from_topic: str = "devices/{iccid}/up"
    payload_encoding: str = "auto"
    max_payload_bytes: int = 262144
    protocol: str = "5"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 1000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # MQTT clients in processes of their own, each with a session in shared_group.
    ingest_processes: int = 1

    def session_client_id(self, n: int) -> str:
        """The client id of ingest session n (mqtt.ingest_processes): session 0 keeps
        client_id, so a gateway going from 1 to more processes keeps its session."""
        return f"{self.client_id}-{n}" if n else self.client_id

    @property
    def store_wait_s(self) -> float:
        """How long a thread handing packets to the store waits for room at a time: half
        the keepalive, so that paho's network thread still answers the broker's."""
        return self.keepalive_s / 2

    def subscriptions(self) -> list[str]:
        """Topic filters as sent to the broker, with the shared-subscription prefix."""
        if not self.shared_group:
            return list(self.topics)
        return [f"$share/{self.shared_group}/{t}" for t in self.topics]


@dataclass(frozen=True, slots=True)
class RecoverySection:
    """[modem.recovery]: what the poller does about a modem that stays off the network or
    stops answering (see gateway.modem.recovery)."""

    enabled: bool = True
    unregistered_s: float = 300.0
    unresponsive_s: float = 120.0
    # How long a step has to bring the modem back (a reset: to answer again and register).
    settle_s: float = 60.0
    max_resets_per_hour: int = 2
    power_cycle_command: str = ""
    power_cycle_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ModemSection:
    port: str = "/dev/ttyUSB2"
    baudrate: int = 115200
    profile: str = "auto"
    poll_interval_s: float = 60.0
    interface: str = "wwan0"
    command_timeout_s: float = 5.0
    # The SIM plan's data per billing cycle, in MB of 1,048,576 bytes; 0: no budget.
    data_budget_mb: float = 0.0
    # The day of the month (UTC) a billing cycle starts; 1-28, so it exists every month.
    billing_day: int = 1
    recovery: RecoverySection = RecoverySection()


@dataclass(frozen=True, slots=True)
class CdrSection:
    interval_s: float = 900.0
    thing_name: str = "ICCID {iccid}"
    thing_id: str = "ThingId_ICCID_{iccid}"
    things_group_id: str = ""
    things_group_name: str = ""
    emit_zero_usage: bool = False


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    window_ms: int = 1000
    max_items: int = 10


@dataclass(frozen=True, slots=True)
class AuthConfig:
    type: str = "none"
    username: str = ""
    password: str = ""
    token: str = ""
    key: str = ""
    header: str = "x-api-key"


@dataclass(frozen=True, slots=True)
class SigningConfig:
    scheme: str = "none"
    secret: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a request again; see DESIGN.md "Auth, signing, retries"."""

    preset: str = "durable"
    timeout_s: float = 30.0
    max_attempts: int = 0  # 0: no limit, max_age_s decides
    retry_on_status: tuple[int, ...] = (408, 425, 429, 500, 501, 502, 503, 504, 505, 506, 507, 508)
    retry_any_5xx: bool = True
    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0
    max_age_s: float = 7 * 24 * 3600.0
    honour_retry_after: bool = True


RETRY_PRESETS: dict[str, RetryPolicy] = {
    "durable": RetryPolicy(),
    # monoZ:Link: wait 90 s for a response, 2 more tries on no response, none on an error.
    "monoz": RetryPolicy(
        preset="monoz",
        timeout_s=90.0,
        max_attempts=3,
        retry_on_status=(),
        retry_any_5xx=False,
        backoff_min_s=1.0,
        backoff_max_s=10.0,
        max_age_s=7 * 24 * 3600.0,
        honour_retry_after=False,
    ),
}


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    name: str
    url: str
    source: str = "packets"
    format: str = "monoz"
    id_field: str = "ICCID"
    iccid_as: str = "auto"
    batch: BatchPolicy = BatchPolicy()
    auth: AuthConfig = AuthConfig()
    headers: tuple[tuple[str, str], ...] = ()
    signing: SigningConfig = SigningConfig()
    retry: RetryPolicy = RetryPolicy()
    when: tuple[Condition, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    gzip: bool = False
    # Requests in flight at once. A monoZ webhook (10 records a request) at 2,000
    # packets/s sends 200 requests/s: at 100 ms a round trip that needs 20 in flight.
    # Even on loopback at 5,000/s, 4 fell behind where 16 kept closer (README, Live).
    concurrency: int = 16
    ca_file: str = ""
    # webhook_lagging once its oldest pending record is older than this; 0: off.
    lag_alert_s: float = 0.0
    # webhook_failing after this many failed attempts in a row; 0: off.
    failing_after: int = 5


@dataclass(frozen=True, slots=True)
class ReportConfig:
    name: str
    task_id: int = 1
    every_s: float = 24 * 3600.0
    at: str = ""
    webhook: str = ""
    # "link": the notice carries a download URL on this gateway (web.public_url);
    # "push": the notice and the zip go together in one multipart POST.
    delivery: str = "link"
    # Which CDRs a run covers: those since the previous run, or the previous UTC day or
    # month by their Timestamp.
    period: str = "since_last"
    filter: tuple[Condition, ...] = ()
    # A pushed report larger than this is dead-lettered instead of sent.
    push_max_mb: float = 10.0


@dataclass(frozen=True, slots=True)
class WebSection:
    listen: str = "127.0.0.1:8080"
    token: str = ""
    public_url: str = "http://127.0.0.1:8080"
    enabled: bool = True
    # Seconds between the dashboard's throughput samples (one hour of them is kept).
    sample_s: float = 5.0
    # Host names (besides the listen address, localhost and public_url's host) that the
    # Host header may carry; any other is answered 421 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # PEM files: both set, the dashboard is served over HTTPS only.
    tls_cert: str = ""
    tls_key: str = ""
    # Seconds a client has to send a request's headers (and, separately, its body);
    # also how long an idle keep-alive connection stays open.
    read_timeout_s: float = 15.0

    @property
    def loopback(self) -> bool:
        """Whether `listen` is a loopback address (no token needed)."""
        return is_loopback(self.listen.rsplit(":", 1)[0].strip("[]"))


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Config:
    mqtt: MqttSection
    gateway: GatewaySection = GatewaySection()
    modem: ModemSection | None = None
    cdr: CdrSection = CdrSection()
    webhooks: tuple[WebhookConfig, ...] = ()
    reports: tuple[ReportConfig, ...] = ()
    web: WebSection = WebSection()
    path: Path | None = None

    @property
    def db_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.gateway.state_dir / "gateway.db"
