"""The deferred-based signer: how our server's signature is added to an event.

``ISigner`` is the seam where a remote signing service or an HSM plugs in
without touching the invite handler, signing with the key the server publishes
(the configured signing key: ``service`` refuses a signer whose probe signature
does not verify with it); ``LocalSigner`` signs with the key we hold.
"""

from __future__ import annotations

from typing import Any

from signedjson.types import SigningKey
from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from .core.events import PreparedEvent
from .core.keys import key_id_of
from .core.roomversions import RoomVersion
from .core.signing import hash_and_sign_event, sign_event

__all__ = ["ISigner", "LocalSigner", "check_signer"]


class ISigner(Interface):
    """Adds our server's signature to events.

    All three attributes are required (``check_signer``). A method may raise
    or fail its Deferred: ``send_invite`` then fails with ``InviteNotSendable``
    (the error as its cause), and an inbound invite is answered 500.
    """

    server_name: str

    def sign_event(
        room_version: RoomVersion, event: dict[str, Any], prepared: PreparedEvent | None = None
    ) -> Deferred[dict[str, Any]]:
        """A new event: ``event`` with our signature added and nothing else changed.

        ``prepared`` (the event's prepared form) may be used to avoid encoding
        the event again; signers that do not need it ignore it.
        """

    def hash_and_sign_event(
        room_version: RoomVersion, event: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        """A new event: our content hash set, then our signature (for events we author)."""


def check_signer(signer: object) -> None:
    """Refuse, with a ``TypeError`` naming what is missing, an object that is no ``ISigner``.

    Checked when the parts are assembled, so that a signer lacking a method
    fails at once rather than on the first invite that needs it.
    """
    missing = [
        name
        for name in ("sign_event", "hash_and_sign_event")
        if not callable(getattr(signer, name, None))
    ]
    if not isinstance(getattr(signer, "server_name", None), str):
        missing.append("server_name (a str)")
    if missing:
        raise TypeError(
            f"{type(signer).__name__} is not an ISigner: it has no {', no '.join(missing)}"
        )


@implementer(ISigner)
class LocalSigner:
    """Signs with a signing key held in this process."""

    def __init__(self, server_name: str, signing_key: SigningKey) -> None:
        self.server_name = server_name
        self.key_id = key_id_of(signing_key)
        self._signing_key = signing_key

    def sign_event(
        self,
        room_version: RoomVersion,
        event: dict[str, Any],
        prepared: PreparedEvent | None = None,
    ) -> Deferred[dict[str, Any]]:
        return succeed(
            sign_event(room_version, event, self.server_name, self._signing_key, prepared=prepared)
        )

    def hash_and_sign_event(
        self, room_version: RoomVersion, event: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        return succeed(
            hash_and_sign_event(room_version, event, self.server_name, self._signing_key)
        )
