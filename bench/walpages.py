"""Where the store's disk bytes go: the gateway's WAL, commit by commit, page by page.

    .venv/bin/python bench/walpages.py [--runs 1000x10,10x30] [--warm N] [--keep DIR]

For each run RATExSECONDS: one mosquitto started here on a free loopback port, the
gateway (monoZ profile, 1 s / 10) delivering to an aiohttp receiver in this process,
and 2 publisher processes sending 71-byte payloads at RATE packets/s for SECONDS. Once
the receiver has every packet and 2 s more have passed (the last completions), the
gateway is killed with SIGKILL, so that its WAL is left as written: it checkpoints only
every 20,000 pages (store.WAL_CHECKPOINT_PAGES), which a run of this size stays under
(the script says so if one happened). With --warm N, each run first sends N packets at
5,000/s and counts only what comes after they are all delivered: a store in use for a
while, with free pages to reuse and (before schema 10, which writes `inflight` only
now and then) an `inflight` row for each packet id already (N >= 65,536 for
mosquitto's ids to come round), where a new store only adds rows.

Each frame of the WAL is then sorted by what its page holds: page 1 (the file header:
page counts, the freelist's head); a table's leaf by the columns of its first row,
matched against the schema (`packets` for either packet table); interior and index
pages by the table or index that owns that page at the end (`dbstat`); anything else
(freelist trunk pages, overflow pages) as "freelist/overflow"; an empty leaf as such.
Prints, per run, pages per commit and WAL bytes per packet for each kind, then the
totals beside two baselines from the same run: the payload bytes themselves and the
disk bytes the gateway process wrote (/proc/<pid>/io write_bytes; the WAL frames plus
the kernel's pages written again, see the README's Footprint section). One JSON line
at the end. Only loopback; every wait is bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import PAYLOAD, LatencySink, gateway_toml, sink_hook, start_gateway, start_publishers
from drain import forget_session, start_broker

MONOZ = "batch = { window_ms = 1000, max_items = 10 }"
WAL_HEADER = 32
FRAME_HEADER = 24
TABLE_LEAF, TABLE_INTERIOR, INDEX_LEAF, INDEX_INTERIOR = 13, 5, 10, 2


def varint(buf: bytes, i: int) -> tuple[int, int]:
    """SQLite's big-endian varint at buf[i]: (value, index after it)."""
    value = 0
    for k in range(8):
        b = buf[i + k]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, i + k + 1
    return (value << 8) | buf[i + 8], i + 9


def kind(serial_type: int) -> str:
    """A record column's storage class: N(ull), I(nteger), F(loat), B(lob), T(ext)."""
    if serial_type == 0:
        return "N"
    if serial_type in (1, 2, 3, 4, 5, 6, 8, 9):
        return "I"
    if serial_type == 7:
        return "F"
    return "B" if serial_type % 2 == 0 else "T"


def first_row_kinds(page: bytes, header_at: int) -> str | None:
    """The storage classes of the first row on a table leaf page; None if it has none."""
    ncells = struct.unpack_from(">H", page, header_at + 3)[0]
    if ncells == 0:
        return None
    cell = struct.unpack_from(">H", page, header_at + 8)[0]
    _size, i = varint(page, cell)
    _rowid, i = varint(page, i)
    header_size, j = varint(page, i)
    kinds = []
    while j < i + header_size:
        st, j = varint(page, j)
        kinds.append(kind(st))
    return "".join(kinds)


def table_signatures(conn: sqlite3.Connection) -> dict[str, str]:
    """Table name -> the storage class each column's declared type expects."""
    expect = {"INTEGER": "I", "TEXT": "T", "BLOB": "B", "REAL": "F", "FLOAT": "F"}
    out = {}
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    for (name,) in tables:
        cols = conn.execute(f"PRAGMA table_info({name})").fetchall()
        out[name] = "".join(expect.get(str(c[2]).upper(), "?") for c in cols)
    return out


def match(kinds: str, signatures: dict[str, str]) -> str | None:
    """The table a row of these storage classes belongs to (NULL fits any column: a
    rowid alias is stored as NULL), if only one fits."""
    names = [
        name
        for name, sig in signatures.items()
        if len(sig) == len(kinds) and all(k in ("N", s) for k, s in zip(kinds, sig, strict=True))
    ]
    if names and all(n.startswith("packets_") for n in names):
        return "packets"
    return names[0] if len(names) == 1 else None


def classify(pgno: int, page: bytes, owners: dict[int, str], signatures: dict[str, str]) -> str:
    if pgno == 1:
        return "page 1"
    page_type = page[0]
    owner = owners.get(pgno, "?")
    if owner.startswith("packets_"):
        owner = "packets"
    if page_type == TABLE_LEAF:
        kinds = first_row_kinds(page, 0)
        if kinds is None:
            return f"{owner} (empty leaf)"
        table = match(kinds, signatures)
        # A row of a table that gained columns later (ALTER TABLE) has fewer.
        return owner if table is None else table
    if page_type == TABLE_INTERIOR:
        return f"{owner} interior"
    if page_type in (INDEX_LEAF, INDEX_INTERIOR):
        return f"index {owner}"
    return "freelist/overflow"


def wal_end(data: bytes) -> int:
    """Where the WAL's frames of its current round end: the file keeps the size it
    reached, and a restarted WAL writes over its start."""
    page_size, salts = struct.unpack_from(">I", data, 8)[0], data[16:24]
    at = WAL_HEADER
    while at + FRAME_HEADER + page_size <= len(data) and data[at + 8 : at + 16] == salts:
        at += FRAME_HEADER + page_size
    return at


def read_wal(
    path: Path, since: tuple[bytes, int]
) -> tuple[int, bool, list[list[tuple[int, bytes]]]]:
    """(page size, whether the WAL was restarted since, the transactions committed after
    `since` (the WAL's header and wal_end then), each as [(pgno, page)]). A restarted WAL
    (a checkpoint) holds only the transactions committed after it."""
    data = path.read_bytes()
    magic, _version, page_size, _ckpt_seq, salt1, salt2 = struct.unpack_from(">IIIIII", data, 0)
    if magic not in (0x377F0682, 0x377F0683):
        raise SystemExit(f"{path}: not a WAL file")
    restarted = data[:WAL_HEADER] != since[0]
    start = 0 if restarted else since[1]
    commits: list[list[tuple[int, bytes]]] = []
    pending: list[tuple[int, bytes]] = []
    at = WAL_HEADER
    while at + FRAME_HEADER + page_size <= len(data):
        pgno, db_size, s1, s2 = struct.unpack_from(">IIII", data, at)
        if (s1, s2) != (salt1, salt2):
            break  # left over from before the WAL was last restarted
        pending.append((pgno, data[at + FRAME_HEADER : at + FRAME_HEADER + page_size]))
        if db_size:
            if at >= start:
                commits.append(pending)
            pending = []
        at += FRAME_HEADER + page_size
    return page_size, restarted, commits


def publish_through(port: int, rate: float, seconds: float, sink: LatencySink, what: str) -> int:
    """Publish at `rate` for `seconds` from 2 publisher processes; once the receiver has
    every packet they had acknowledged, and 2 s more have passed (the last batches'
    completions), the number of packets."""
    pubs = start_publishers(port, rate, seconds, 2)
    deadline = time.monotonic() + seconds + 120
    while not (pubs.done() and len(sink.seen) >= sum(r["acked"] for r in pubs.results())):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: the receiver did not get every packet in time")
        time.sleep(0.2)
    time.sleep(2.0)
    return sum(r["acked"] for r in pubs.results())


def run(rate: float, seconds: float, work: Path, warm: int = 0) -> dict[str, Any]:
    broker, port = start_broker(work)
    sink = LatencySink()
    name = f"wal-{rate:g}"
    state = work / f"state-{name}"
    db = state / "gateway.db"
    wal = db.with_name("gateway.db-wal")
    cfg = gateway_toml(work / f"{name}.toml", port, state, name, sink_hook(sink.port, MONOZ))
    proc = start_gateway(cfg, port, name, work / f"{name}.log")
    try:
        if warm:
            publish_through(port, 5000, warm / 5000, sink, "warm-up")
            sink.seen.clear()
        written_before = psutil.Process(proc.pid).io_counters().write_bytes
        # Start-up's own commits (schema, routes) and the warm-up's are not counted.
        data = wal.read_bytes()
        wal_start = (data[:WAL_HEADER], wal_end(data))
        sent = publish_through(port, rate, seconds, sink, name)
        written = psutil.Process(proc.pid).io_counters().write_bytes - written_before
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        sink.stop()
        forget_session(port, name)
        broker.terminate()
        broker.wait(30)

    # Read a copy: opening the store itself would recover (and then check point) its WAL.
    copy = work / f"{name}-copy.db"
    shutil.copy(db, copy)
    shutil.copy(wal, copy.with_name(copy.name + "-wal"))
    page_size, checkpointed, commits = read_wal(copy.with_name(copy.name + "-wal"), wal_start)
    conn = sqlite3.connect(copy)
    try:
        owners = {int(p): str(n) for n, p in conn.execute("SELECT name, pageno FROM dbstat")}
        signatures = table_signatures(conn)
    finally:
        conn.close()

    per_kind: collections.Counter[str] = collections.Counter()
    packet_commits = 0
    for frames in commits:
        kinds = [classify(pgno, page, owners, signatures) for pgno, page in frames]
        per_kind.update(kinds)
        packet_commits += "packets" in kinds
    frames_total = sum(per_kind.values())
    frame_bytes = FRAME_HEADER + page_size
    payload = len(PAYLOAD % (0, sent // 2, time.time_ns()))
    return {
        "rate": rate,
        "seconds": seconds,
        "warm": warm,
        "packets": sent,
        "payload_bytes": payload,
        "commits": len(commits),
        "commits_with_packets": packet_commits,
        "commits_per_s": len(commits) / seconds,
        "checkpointed": checkpointed,
        "pages_per_commit": frames_total / max(1, len(commits)),
        "wal_bytes_per_packet": frames_total * frame_bytes / sent,
        "disk_bytes_per_packet": written / sent,
        "kinds": {
            k: {
                "pages_per_commit": n / max(1, len(commits)),
                "wal_bytes_per_packet": n * frame_bytes / sent,
            }
            for k, n in per_kind.most_common()
        },
    }


def report(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"\n{r['rate']:g} packets/s for {r['seconds']:g} s, monoZ: {r['packets']:,} packets"
            f" of {r['payload_bytes']} bytes, {r['commits']:,} commits"
            f" ({r['commits_per_s']:.1f}/s, {r['commits_with_packets']:,} with packets),"
            f" {r['pages_per_commit']:.1f} pages each"
            + (f", after {r['warm']:,} packets" if r["warm"] else "")
        )
        if r["checkpointed"]:
            print("  (the WAL was checkpointed: only the frames since are counted)")
        print(f"  {'what':<28} {'pages/commit':>12} {'B/pkt':>8} {'B/payload B':>12}")
        for k, v in r["kinds"].items():
            b = v["wal_bytes_per_packet"]
            print(
                f"  {k:<28} {v['pages_per_commit']:>12.2f} {b:>8.1f}"
                f" {b / r['payload_bytes']:>12.2f}"
            )
        for label, b in (
            ("WAL frames in all", r["wal_bytes_per_packet"]),
            ("disk bytes written", r["disk_bytes_per_packet"]),
            ("baseline: the payload", float(r["payload_bytes"])),
        ):
            print(f"  {label:<28} {'':>12} {b:>8.1f} {b / r['payload_bytes']:>12.2f}")
    print(json.dumps({"bench": "walpages", "runs": rows}))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", default="1000x10,10x30", metavar="RATExSECONDS,…")
    ap.add_argument("--keep", type=Path, help="leave the runs' files in this directory")
    ap.add_argument("--warm", type=int, default=0, help="packets sent before each run")
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("needs Debian's mosquitto")
    work = Path(tempfile.mkdtemp(prefix="walpages-", dir=args.keep))
    rows = []
    try:
        for spec in args.runs.split(","):
            rate, _, seconds = spec.partition("x")
            rows.append(run(float(rate), float(seconds or 10), work, args.warm))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
