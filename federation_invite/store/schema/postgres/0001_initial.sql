-- Schema version 1: invites, remote server keys, local users, per-user invite rules.
-- Timestamps are milliseconds since the Unix epoch, as Matrix writes them.
-- PostgreSQL variant of schema/0001_initial.sql: identifiers and patterns use the "C"
-- collation, so they sort by code point as in SQLite (lists come back in the same order
-- on both backends) instead of by the server's locale.

-- One row per received invite, created once per event_id (the primary key makes
-- INSERT ... ON CONFLICT DO NOTHING idempotent across workers).
CREATE TABLE invites (
    event_id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    room_id TEXT COLLATE "C" NOT NULL,
    room_version TEXT COLLATE "C" NOT NULL,
    invitee TEXT COLLATE "C" NOT NULL,
    sender TEXT COLLATE "C" NOT NULL,
    origin TEXT COLLATE "C" NOT NULL,
    -- Canonical JSON text of the co-signed event we answered, and of invite_room_state.
    event_json TEXT NOT NULL,
    invite_room_state_json TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'ignored', 'accepted', 'rejected'))
);

-- Lists are newest first (received_ts DESC, event_id DESC), filtered by any of these.
CREATE INDEX invites_by_invitee ON invites (invitee, received_ts, event_id);
CREATE INDEX invites_by_room ON invites (room_id, received_ts, event_id);
CREATE INDEX invites_by_status ON invites (status, received_ts, event_id);
CREATE INDEX invites_by_received ON invites (received_ts, event_id);

-- Remote servers' verify keys with their validity, shared by every worker.
CREATE TABLE server_keys (
    server_name TEXT COLLATE "C" NOT NULL,
    key_id TEXT COLLATE "C" NOT NULL,
    verify_key TEXT NOT NULL,
    valid_until_ts BIGINT,
    expired_ts BIGINT,
    fetched_ts BIGINT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The users this server accepts invites for.
CREATE TABLE local_users (
    user_id TEXT COLLATE "C" NOT NULL PRIMARY KEY
);

-- Per-user rules over senders (kind 'user') or their servers (kind 'server'), as globs.
CREATE TABLE invite_rules (
    user_id TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'server')),
    pattern TEXT COLLATE "C" NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('allow', 'block', 'ignore')),
    PRIMARY KEY (user_id, kind, pattern, action)
);
