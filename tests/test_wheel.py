"""The wheel is the product: built by scripts/wheel, installed into a fresh venv outside
the checkout with constraints.txt, its `gateway` runs the demo and checks a config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "gateway.example.toml"


def run(cmd: list[str | Path], cwd: Path, timeout: float, **kw: object) -> str:
    done = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,  # type: ignore[call-overload]
    )
    assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def test_the_wheel_installed_outside_the_checkout_runs_the_demo_and_checks_a_config(
    tmp_path: Path,
) -> None:
    # No PYTHONPATH and a cwd outside the checkout: only the installed wheel can answer.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheel = run(
        [ROOT / "scripts" / "wheel", tmp_path / "dist"],
        tmp_path,
        120,
        env={**env, "PYTHON": sys.executable},
    ).strip()
    assert re.fullmatch(r".*/edge_gateway-[^/]+-py3-none-any\.whl", wheel), wheel

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, 120, env=env)
    python, gateway = venv / "bin" / "python", venv / "bin" / "gateway"
    run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", ROOT / "constraints.txt", wheel],
        tmp_path, 300, env=env,
    )  # fmt: skip
    where = run(
        [python, "-c", "import gateway, firmware_sim; print(gateway.__file__, firmware_sim.__file__)"],
        tmp_path, 30, env=env,
    ).split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where

    out = run(
        [gateway, "demo", "--duration", "6", "--devices", "2", "--rate", "2"],
        tmp_path, 120, env=env,
    )  # fmt: skip
    assert "broker: mosquitto" in out
    delivered = re.search(r"^  packets\.delivered +(\d+)$", out, re.MULTILINE)
    assert delivered, out
    assert int(delivered.group(1)) > 0, out

    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "mqtt-password").write_text("")
    (creds / "mqtt-password").chmod(0o600)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(EXAMPLE.read_text().replace("/var/lib/edge-gateway", str(tmp_path / "state")))
    run(
        [gateway, "check-config", "-c", cfg],
        tmp_path, 30, env={**env, "CREDENTIALS_DIRECTORY": str(creds)},
    )  # fmt: skip
