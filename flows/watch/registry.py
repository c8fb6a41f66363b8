"""The run registry: one SQLite file recording every checkpoint seen and every analysis."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.watch.deployment_runs import flow_run_state

# Set per checkpoint by the watcher; an override of these would make analyses collide.
WATCHER_OWNED = ("weights", "out_dir", "train_store", "eval_store")


def params_hash(overrides: dict[str, Any] | None) -> str:
    """sha256 of the complete, validated pipeline parameters (defaults filled in), without the
    fields the watcher sets per checkpoint."""
    return hashlib.sha256(canonical_params(overrides).encode()).hexdigest()


def canonical_params(overrides: dict[str, Any] | None) -> str:
    overrides = dict(overrides or {})
    owned = sorted(set(overrides) & set(WATCHER_OWNED))
    if owned:
        raise ValueError(f"watch-checkpoints sets {', '.join(owned)} itself; remove them from params")
    full = PipelineParams(**overrides).model_dump(mode="json", exclude=set(WATCHER_OWNED))
    return json.dumps(full, sort_keys=True, separators=(",", ":"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age_s(iso: str | None) -> float:
    if not iso:
        return float("inf")
    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER,
    stamp TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (url, sha256)
);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS refused (
    url TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    size INTEGER,
    stamp TEXT,
    sha256 TEXT,
    reason TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (url, params_hash)
);
CREATE INDEX IF NOT EXISTS refused_sha ON refused (sha256);
CREATE TABLE IF NOT EXISTS analyses (
    sha256 TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    checkpoint TEXT NOT NULL,
    weights TEXT,
    out_dir TEXT NOT NULL,
    params TEXT NOT NULL,
    flow_run_id TEXT,
    watcher_run_id TEXT,
    deployment TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    error TEXT,
    result TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (sha256, params_hash)
);
"""


class Registry:
    """The SQLite run registry. Each method is one short transaction; connections are not
    shared, so one object may be used from several threads and several processes may use the
    same file (it must live on a local disk: SQLite locking is unreliable on network shares)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as con:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the database's write lock up front, so a
        read-then-write inside it cannot interleave with another process."""
        con = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        con = sqlite3.connect(self.path, timeout=120)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
        finally:
            con.close()

    # files -----------------------------------------------------------------------------------
    def known_sha(self, url: str, size: int | None, stamp: str | None) -> str | None:
        if stamp is None:
            return None
        rows = self._read("SELECT sha256 FROM files WHERE url=? AND size IS ? AND stamp=? "
                          "ORDER BY last_seen DESC LIMIT 1", (url, size, stamp))
        return rows[0]["sha256"] if rows else None

    def record_file(self, url: str, sha256: str, size: int | None, stamp: str | None) -> None:
        now = _now()
        with self._tx() as con:
            con.execute(
                "INSERT INTO files (url, sha256, size, stamp, first_seen, last_seen) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (url, sha256) DO UPDATE SET size=excluded.size, stamp=excluded.stamp, "
                "last_seen=excluded.last_seen", (url, sha256, size, stamp, now, now))

    # refused files ------------------------------------------------------------------------------
    # A file that cannot be analysed (not a checkpoint, or a checkpoint that does not load into
    # the model) is recorded once with the reason, never with any of its contents, and left
    # alone until it changes: by (URL, size, stamp) for a file refused before it was read, by
    # content (sha256) and parameters for one refused when loaded.
    ANY_PARAMS = ""

    def refuse(self, url: str, reason: str, *, size: int | None, stamp: str | None,
               sha256: str | None = None, params_hash: str = ANY_PARAMS) -> bool:
        """Record ``url`` as refused; True when this is news (not already recorded as is)."""
        now = _now()
        with self._tx() as con:
            row = con.execute("SELECT size, stamp, sha256, reason FROM refused WHERE url=? AND params_hash=?",
                              (url, params_hash)).fetchone()
            con.execute(
                "INSERT INTO refused (url, params_hash, size, stamp, sha256, reason, first_seen, last_seen) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (url, params_hash) DO UPDATE SET size=excluded.size, "
                "stamp=excluded.stamp, sha256=excluded.sha256, reason=excluded.reason, last_seen=excluded.last_seen",
                (url, params_hash, size, stamp, sha256, reason, now, now))
        return row is None or tuple(row) != (size, stamp, sha256, reason)

    def refused_file(self, url: str, size: int | None, stamp: str | None) -> str | None:
        """The reason ``url`` was refused before being read, if it has not changed since."""
        if stamp is None:  # no way to tell a rewrite: checked again (it costs a few bytes)
            return None
        rows = self._read("SELECT reason FROM refused WHERE url=? AND params_hash=? AND sha256 IS NULL "
                          "AND size IS ? AND stamp=?", (url, self.ANY_PARAMS, size, stamp))
        return rows[0]["reason"] if rows else None

    def refused_content(self, sha256: str, params_hash: str) -> str | None:
        """The reason a checkpoint with this content was refused for these parameters."""
        rows = self._read("SELECT reason FROM refused WHERE sha256=? AND params_hash=? "
                          "ORDER BY last_seen DESC LIMIT 1", (sha256, params_hash))
        return rows[0]["reason"] if rows else None

    def forget_refusal(self, url: str) -> None:
        """``url`` is a usable checkpoint now: its refusal before reading no longer holds."""
        with self._tx() as con:
            con.execute("DELETE FROM refused WHERE url=? AND params_hash=? AND sha256 IS NULL",
                        (url, self.ANY_PARAMS))

    def refusals(self) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM refused ORDER BY url, params_hash")

    def paths(self, sha256: str) -> list[str]:
        return [r["url"] for r in self._read("SELECT url FROM files WHERE sha256=? ORDER BY url", (sha256,))]

    # analyses --------------------------------------------------------------------------------
    def get(self, sha256: str, phash: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM analyses WHERE sha256=? AND params_hash=?", (sha256, phash))
        return rows[0] if rows else None

    def claim(self, sha256: str, phash: str, *, checkpoint: str, out_dir: str, params: str,
              watcher_run_id: str | None, deployment: str | None,
              take_over: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Mark (sha256, phash) running for this caller and return the row, or None when it is
        completed or running elsewhere. A failed row is retried; a running row only when
        ``take_over`` is that very row (same attempts and start time: nobody took it since)."""
        now = _now()
        with self._tx() as con:
            row = con.execute("SELECT * FROM analyses WHERE sha256=? AND params_hash=?",
                              (sha256, phash)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO analyses (sha256, params_hash, status, checkpoint, out_dir, params, "
                    "watcher_run_id, deployment, attempts, created_at, started_at, updated_at) "
                    "VALUES (?,?,'running',?,?,?,?,?,1,?,?,?)",
                    (sha256, phash, checkpoint, out_dir, params, watcher_run_id, deployment, now, now, now))
            else:
                row = dict(row)
                if row["status"] == "completed":
                    return None
                if row["status"] == "running" and not (
                        take_over is not None and take_over["attempts"] == row["attempts"]
                        and take_over["started_at"] == row["started_at"]):
                    return None
                con.execute(
                    "UPDATE analyses SET status='running', checkpoint=?, out_dir=?, params=?, "
                    "watcher_run_id=?, deployment=?, flow_run_id=NULL, error=NULL, result=NULL, "
                    "attempts=attempts+1, started_at=?, finished_at=NULL, updated_at=? "
                    "WHERE sha256=? AND params_hash=?",
                    (checkpoint, out_dir, params, watcher_run_id, deployment, now, now, sha256, phash))
            return dict(con.execute("SELECT * FROM analyses WHERE sha256=? AND params_hash=?",
                                    (sha256, phash)).fetchone())

    def update(self, sha256: str, phash: str, **fields: Any) -> None:
        allowed = {"weights", "flow_run_id", "status", "error", "result", "finished_at"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        fields["updated_at"] = _now()
        if fields.get("result") is not None and not isinstance(fields["result"], str):
            fields["result"] = json.dumps(fields["result"], default=str)
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as con:
            con.execute(f"UPDATE analyses SET {cols} WHERE sha256=? AND params_hash=?",
                        (*fields.values(), sha256, phash))

    def finish(self, sha256: str, phash: str, status: str, *, error: str | None = None,
               result: Any = None, flow_run_id: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "error": error, "result": result,
                                  "finished_at": _now()}
        if flow_run_id is not None:
            fields["flow_run_id"] = flow_run_id
        self.update(sha256, phash, **fields)

    def analyses(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every analysis, newest first, with ``paths`` (every URL seen with this content) and
        ``aliases`` (those other than the checkpoint analysed)."""
        sql = "SELECT * FROM analyses" + (" WHERE status=?" if status else "") + " ORDER BY created_at DESC"
        rows = self._read(sql, (status,) if status else ())
        for row in rows:
            row["paths"] = self.paths(row["sha256"])
            row["aliases"] = [p for p in row["paths"] if p != row["checkpoint"]]
            row["result"] = json.loads(row["result"]) if row["result"] else None
        return rows


def abandoned(row: dict[str, Any], stale_after_s: float, current_run: str | None) -> tuple[bool, str | None]:
    """Is a ``running`` row dead? Returns (take over, status to record first when the flow run
    it names has in fact completed)."""
    if row.get("flow_run_id"):
        state = flow_run_state(row["flow_run_id"])
        if state is not None and state.is_final():
            return (False, "completed") if state.is_completed() else (True, None)
        if state is not None:
            return False, None  # scheduled, pending or running somewhere
    elif row.get("watcher_run_id") and row["watcher_run_id"] != current_run:
        state = flow_run_state(row["watcher_run_id"])
        if state is not None and state.is_final():
            return True, None  # the watcher that ran it in-process is gone
    return _age_s(row.get("started_at")) > stale_after_s, None
