"""The service wires its parts: a [modem] section starts the poller alongside ingest."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Broker, db_rows, gateway_cmd, wait_for, write_config


def test_modem_section_starts_the_poller_and_snapshots_land_in_the_store(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    emu = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "modem", "--vendor", "telit", "--pty", "--no-urcs"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert emu.stdout is not None
        pty = emu.stdout.readline().decode().strip()
        assert pty.startswith("/dev/")
        cfg = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            extra=f'[modem]\nport = "{pty}"\nprofile = "auto"\npoll_interval_s = 0.5\n',
        )
        gw = gateway_proc(cfg)
        gw.start()
        db = tmp_path / "state" / "gateway.db"

        def snapshot() -> dict[str, object] | None:
            if not db.exists():
                return None
            try:
                rows = db_rows(db, "SELECT state, data FROM modem_snapshots WHERE state = 'ok'")
            except sqlite3.OperationalError:
                return None  # the file exists before its schema does

            return json.loads(str(rows[-1][1])) if rows else None

        data = wait_for(snapshot, timeout=30, what="an ok modem snapshot")
        assert isinstance(data, dict)
        assert data["vendor"] == "Telit"
        assert str(data["iccid"]).startswith("89")
        assert gw.terminate() == 0
        out = subprocess.run(
            gateway_cmd("modem", "info", "--port", pty, "--json"),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        assert json.loads(out)["iccid"] == data["iccid"]
    finally:
        emu.terminate()
        emu.wait(10)
        if emu.stdout:
            emu.stdout.close()
