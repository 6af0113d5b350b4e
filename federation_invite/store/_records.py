"""The values the store keeps, as small frozen records, and the store's own error.

Records check their fields when built, so a bad value is refused with a
``ValueError`` before any SQL runs, and both backends see exactly the same data
(PostgreSQL refuses NUL characters in text, SQLite would keep them; we refuse
them everywhere).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from ..core.canonical import MAX_SAFE_INTEGER, MIN_SAFE_INTEGER

__all__ = [
    "ACTIONS",
    "INVITE_STATUSES",
    "RULE_KINDS",
    "InviteRecord",
    "InviteRule",
    "SchemaVersionError",
    "ServerKeyRecord",
    "StoreError",
]

#: ``pending``: handed over to the application; ``ignored``: stored but not
#: handed over because an ``ignore`` rule matched; ``accepted``/``rejected``:
#: what the invitee did with it.
INVITE_STATUSES: Final = frozenset({"pending", "ignored", "accepted", "rejected"})
#: What an invite rule's pattern is matched against: the sender's user ID or its server name.
RULE_KINDS: Final = frozenset({"user", "server"})
#: What a matching rule does with the invite.
ACTIONS: Final = frozenset({"allow", "block", "ignore"})


class StoreError(Exception):
    """A database operation failed (connection, constraint, driver error).

    The message names the operation and the driver's complaint, never a password
    from the database URI. The web layer answers it as ``500 M_UNKNOWN`` and logs
    it; the driver's exception is kept as ``__cause__``.
    """

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(f"{operation} failed: {message}")
        self.operation = operation


class SchemaVersionError(StoreError):
    """The database's schema version is not the one this code works with.

    Raised when the database is newer than the code (never touched: an older
    release must not write to a newer schema), or older than the code while
    migrations were not asked for.
    """

    def __init__(self, message: str, *, database_version: int, code_version: int) -> None:
        super().__init__("schema check", message)
        self.database_version = database_version
        self.code_version = code_version


def _encodable(value: str) -> bool:
    """Whether ``value`` has a UTF-8 form: no lone surrogate (``"\\udc80"``), which
    neither database driver can send, and which failed a whole batch of invites."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(name: str, value: object) -> str:
    """Refuse anything but a non-empty string of valid Unicode without NUL characters."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    if not _encodable(value):
        raise ValueError(f"{name} must be valid Unicode (no lone surrogates)")
    return value


def check_timestamp(name: str, value: object, *, optional: bool = False) -> int | None:
    """Refuse anything but an integer in Matrix's interoperable range (or None if optional)."""
    if value is None and optional:
        return None
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if not MIN_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise ValueError(f"{name} {value} is outside the range of Matrix integers")
    return value


def check_choice(name: str, value: object, choices: frozenset[str]) -> str:
    """Refuse a value that is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, not {value!r}")
    return value


def _text(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    # The common case decided here; check_text words the refusal.
    if (
        type(value) is not str
        or not value
        or "\x00" in value
        or not (value.isascii() or _encodable(value))
    ):
        check_text(attribute.name, value)


def _optional_text(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_text(attribute.name, value)


def _timestamp(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    check_timestamp(attribute.name, value)


def _optional_timestamp(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    check_timestamp(attribute.name, value, optional=True)


def _of_type(kind: type) -> Any:
    def validate(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, kind):
            found = type(value).__name__
            raise ValueError(f"{attribute.name} must be a {kind.__name__}, not {found}")

    return validate


def _choice(choices: frozenset[str]) -> Any:
    def validate(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
        check_choice(attribute.name, value, choices)

    return validate


@attrs.frozen
class InviteRecord:
    """One received invite: the co-signed event we answered and what became of it.

    ``event`` and ``invite_room_state`` are kept as canonical JSON text, so what
    comes back is exactly what went in. ``received_ts`` is milliseconds since the
    epoch. Records hold dicts, so they compare by value but are not hashable.
    """

    event_id: str = attrs.field(validator=_text)
    room_id: str = attrs.field(validator=_text)
    room_version: str = attrs.field(validator=_text)
    invitee: str = attrs.field(validator=_text)
    sender: str = attrs.field(validator=_text)
    origin: str = attrs.field(validator=_text)
    event: dict[str, Any] = attrs.field(validator=_of_type(dict))
    invite_room_state: list[Any] = attrs.field(validator=_of_type(list))
    received_ts: int = attrs.field(validator=_timestamp)
    status: str = attrs.field(default="pending", validator=_choice(INVITE_STATUSES))
    #: ``event``'s canonical JSON text, when the caller has it already: the store
    #: then writes it as it is instead of encoding ``event`` again. It must be
    #: exactly that encoding (``encode_canonical_json(event, strict=False)``).
    #: Records read from a store carry the text they were stored with. Not
    #: compared: records are equal when their fields above are. ``attrs.evolve``
    #: keeps it: give ``event_json=None`` with a new ``event``.
    event_json: str | None = attrs.field(
        default=None, kw_only=True, eq=False, repr=False, validator=_optional_text
    )


@attrs.frozen
class ServerKeyRecord:
    """A remote server's verify key with its validity, as any worker may reuse it.

    ``verify_key`` is unpadded base64. ``valid_until_ts`` is set for current keys,
    ``expired_ts`` for old ones (server-server-api, "Retrieving server keys");
    ``fetched_ts`` orders fetches so that a newer one replaces an older one;
    ``source`` says where it came from (the server itself or a notary).
    """

    server_name: str = attrs.field(validator=_text)
    key_id: str = attrs.field(validator=_text)
    verify_key: str = attrs.field(validator=_text)
    valid_until_ts: int | None = attrs.field(validator=_optional_timestamp)
    expired_ts: int | None = attrs.field(validator=_optional_timestamp)
    fetched_ts: int = attrs.field(validator=_timestamp)
    source: str = attrs.field(validator=_text)


@attrs.frozen
class InviteRule:
    """One of a local user's invite rules: a glob over senders' user IDs or server names.

    The store only keeps rules; which rule wins when several match is the
    policy's decision.
    """

    user_id: str = attrs.field(validator=_text)
    kind: str = attrs.field(validator=_choice(RULE_KINDS))
    pattern: str = attrs.field(validator=_text)
    action: str = attrs.field(validator=_choice(ACTIONS))
