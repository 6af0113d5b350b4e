"""What SQLite alone costs per stored invite: CPU per row by batch size and by index.

Inserts invite-like rows (random event and room IDs, 1,000 invitees, a 1 KB
event) into a fresh WAL file with ``synchronous = FULL``, in transactions of
B rows, exactly as the store writes them (the same schema and statement), and
prints the CPU per row (user and system) over the second half of the rows,
for the schema as it is and with indexes taken away: what the storage floor
is for any server keeping these rows in SQLite, before any Python of ours.

    python benchmarks/sqlite_rows.py [ROWS] [--batches 1,10,30,100]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sqlite3
import string
import tempfile
from pathlib import Path

SCHEMA = (
    Path(__file__).resolve().parents[1]
    / "federation_invite"
    / "store"
    / "schema"
    / "0001_initial.sql"
)
INSERT = (
    "INSERT INTO invites (event_id, room_id, room_version, invitee, sender, origin,"
    " event_json, invite_room_state_json, received_ts, status)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)


def schema(variant: str) -> str:
    text = SCHEMA.read_text()
    if variant == "no room index":
        return text.replace(
            "CREATE INDEX invites_by_room ON invites (room_id, received_ts, event_id);", ""
        )
    if variant == "primary key only":
        return "\n".join(line for line in text.splitlines() if not line.startswith("CREATE INDEX"))
    return text


def rows(count: int) -> list[tuple[object, ...]]:
    generator = random.Random(1)

    def name(length: int) -> str:
        return "".join(generator.choices(string.ascii_letters + string.digits, k=length))

    event_json = '{"content":{"membership":"invite"},"x":"' + "a" * 1000 + '"}'
    return [
        (
            "$" + name(43),
            "!" + name(18) + ":origin.example",
            "10",
            f"@user{generator.randrange(1000)}:localhost",
            "@alice:origin.example",
            "origin.example",
            event_json,
            "[]",
            1_700_000_000_000 + index // 3,
            "pending",
        )
        for index in range(count)
    ]


def measure(variant: str, batch: int, data: list[tuple[object, ...]]) -> tuple[float, float]:
    """(user, system) CPU microseconds per row over the second half of ``data``."""
    with tempfile.TemporaryDirectory() as work:
        connection = sqlite3.connect(os.path.join(work, "rows.db"), isolation_level=None)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        connection.executescript(schema(variant))

        def insert(part: list[tuple[object, ...]]) -> None:
            for start in range(0, len(part), batch):
                connection.execute("BEGIN IMMEDIATE")
                for row in part[start : start + batch]:
                    connection.execute(INSERT, row)
                connection.execute("COMMIT")

        half = len(data) // 2
        insert(data[:half])
        before = resource.getrusage(resource.RUSAGE_SELF)
        insert(data[half:])
        after = resource.getrusage(resource.RUSAGE_SELF)
        connection.close()
    measured = len(data) - half
    return (
        (after.ru_utime - before.ru_utime) / measured * 1e6,
        (after.ru_stime - before.ru_stime) / measured * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, nargs="?", default=20000)
    parser.add_argument(
        "--batches", default="1,10,30,100", type=lambda text: [int(b) for b in text.split(",")]
    )
    args = parser.parse_args()
    data = rows(args.rows)
    print(f"# {args.rows} rows, CPU per row over the last {args.rows - args.rows // 2}")
    for variant in ("as it is", "no room index", "primary key only"):
        for batch in args.batches:
            user, system = measure(variant, batch, data)
            print(
                f"{variant:17} {batch:4} rows a commit: {user + system:6.1f} us a row"
                f" (user {user:5.1f}, system {system:5.1f})"
            )


if __name__ == "__main__":
    main()
