"""The configuration: one TOML file into frozen dataclasses (`schema`), every value read
and checked with a message naming its key path (`readers`, `load`), secrets resolved
from the environment or files and masked wherever the config is shown (`secrets`), and
what a config leaves open to others (`exposure`)."""

from __future__ import annotations

from gateway.config.exposure import warnings
from gateway.config.load import load, parse
from gateway.config.readers import duration_s
from gateway.config.schema import (
    CDR_FIELDS,
    CDR_NUMBER_FIELDS,
    FORMATS,
    OPS,
    PAYLOAD_ENCODINGS,
    RETRY_PRESETS,
    SOURCES,
    AuthConfig,
    BatchPolicy,
    CdrSection,
    Condition,
    Config,
    GatewaySection,
    ModemSection,
    MqttSection,
    RecoverySection,
    ReportConfig,
    RetryPolicy,
    SigningConfig,
    WebhookConfig,
    WebSection,
    is_loopback,
)
from gateway.config.secrets import MASK, SECRET_KEYS, is_secret_name, mask_url, mask_urls, masked

__all__ = [
    "CDR_FIELDS",
    "CDR_NUMBER_FIELDS",
    "FORMATS",
    "MASK",
    "OPS",
    "PAYLOAD_ENCODINGS",
    "RETRY_PRESETS",
    "SECRET_KEYS",
    "SOURCES",
    "AuthConfig",
    "BatchPolicy",
    "CdrSection",
    "Condition",
    "Config",
    "GatewaySection",
    "ModemSection",
    "MqttSection",
    "RecoverySection",
    "ReportConfig",
    "RetryPolicy",
    "SigningConfig",
    "WebSection",
    "WebhookConfig",
    "duration_s",
    "is_loopback",
    "is_secret_name",
    "load",
    "mask_url",
    "mask_urls",
    "masked",
    "parse",
    "warnings",
]
