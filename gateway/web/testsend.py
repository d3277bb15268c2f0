"""The body of the dashboard's "Send test" request: one record in the webhook's format."""

from __future__ import annotations

import secrets
import string

from gateway.config import Config, WebhookConfig
from gateway.delivery import formats
from gateway.store import PacketRow
from gateway.usage import reports

TEST_ICCID = "8900000000000000000"
TEST_PAYLOAD = b'{"test":"edge-gateway test request"}'


def test_body(hook: WebhookConfig, cfg: Config, now_ns: int) -> bytes:
    """One request body in the webhook's format, clearly marked as a test."""
    now_iso = formats.iso_ms(now_ns)
    if hook.source == "packets":
        template = cfg.mqtt.iccid_from_topic or "gateway/test/{iccid}"
        row = PacketRow(
            0, now_ns, template.replace("{iccid}", TEST_ICCID), TEST_ICCID, TEST_PAYLOAD
        )
        opts = formats.PayloadOptions(cfg.mqtt.payload_encoding, hook.id_field, hook.iccid_as)
        if hook.format == "monoz":
            return formats.monoz([row], opts, single=True)[0]
        record, _ = formats.packet_record(row, opts)
    elif hook.source == "cdrs":
        alnum = string.ascii_uppercase + string.digits
        record = {
            "CdrType": "DATA",
            "UniqueID": "CDR-" + "".join(secrets.choice(alnum) for _ in range(20)),
            "Iccid": TEST_ICCID,
            "IMSI": "",
            "MSISDN": "",
            "IMEI": "",
            "MNO": "",
            "MnoName": "",
            "MCC": "",
            "MNC": "",
            "ThingName": "edge-gateway test",
            "ThingId": "",
            "ThingsGroupId": "",
            "ThingsGroupName": "",
            "Timestamp": now_ns // 1_000_000,
            "Usage": 0,
            "APN": "",
        }
        if hook.format == "monogoto":
            return formats.monogoto([record])
    elif hook.source == "reports":
        return formats.report_notice(
            {
                "contentType": "application/zip",
                "httpMethod": "GET",
                "callbackURL": cfg.web.public_url.rstrip("/") + reports.DOWNLOAD_PREFIX + "test",
                "validUntil": formats.iso_ms(now_ns + reports.VALID_FOR_NS),
                "fileName": "test.zip",
                "fileSizeInBytes": 0,
                "numberOfLines": 0,
                "taskName": "edge-gateway test",
                "taskId": 0,
                "error": "test notice: no report was generated",
            }
        )
    else:
        record = {"kind": "test", "Timestamp": now_iso, "text": "edge-gateway test request"}
    kind = {"packets": "packet", "cdrs": "cdr"}.get(hook.source, "event")
    if hook.format == "envelope":
        return formats.envelope(record, hook.meta, hook.name, kind)
    return formats.flat(record)
