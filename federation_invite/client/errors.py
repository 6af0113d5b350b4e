"""What can go wrong talking to another server, in two kinds.

``RemoteError``: the peer answered, and the answer was an error (or not JSON,
or too big). ``TransportError``: we could not get an answer at all (DNS, TLS,
refused, blocked address, timeout, back-off). Neither is a ``MatrixError``: a
peer's ``403 M_FORBIDDEN`` is a fact about the peer, and must never be passed
on to our own callers as if we had said it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError

__all__ = [
    "BackoffError",
    "BlockedAddressError",
    "CancelledBeforeSending",
    "RemoteError",
    "TransportError",
]


class RemoteError(Exception):
    """The destination answered with an error status, or with a body we cannot use.

    ``status`` is the HTTP status; ``errcode`` and ``message`` come from a
    Matrix error body (``{"errcode": ..., "error": ...}``) when there is one,
    otherwise ``errcode`` is None and ``message`` describes the problem.
    ``body`` is the parsed JSON when the body was JSON, else the raw bytes.
    """

    def __init__(
        self,
        destination: str,
        status: int,
        errcode: str | None,
        message: str,
        body: Any = None,
    ) -> None:
        self.destination = destination
        self.status = status
        self.errcode = errcode
        self.message = message
        self.body = body
        super().__init__(destination, status, errcode, message)

    def __str__(self) -> str:
        code = f" {self.errcode}" if self.errcode else ""
        return f"{self.destination} answered {self.status}{code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"RemoteError(destination={self.destination!r}, status={self.status!r}, "
            f"errcode={self.errcode!r}, message={self.message!r})"
        )


class TransportError(Exception):
    """No usable answer came back from the destination: ``reason`` says why.

    ``resolver_busy``: the request timed out while its address lookups waited for a
    resolver thread (all of them busy with lookups that hang, which anyone can cause),
    so it may never have reached the destination: not its fault. Neither the client
    nor the keyring backs the destination off for it.

    ``abandoned``: ``FederationClient.close()`` abandoned the request's server discovery
    (its ``.well-known`` fetch or SRV query) or its address lookup (still waiting for a
    resolver thread), so it never reached the destination: we gave up, not it. Neither the
    client nor the keyring backs the destination off for it either.

    ``not_sent``: the request was never sent, for a cause of ours: connecting failed
    because this process or system was out of file descriptors or memory (EMFILE,
    ENFILE, ENOBUFS, ENOMEM), or its timeout came while it waited for its turn behind the
    requests in flight to the destination (``FederationClient``'s
    ``concurrent_per_destination``). Not the destination's fault: neither the client nor
    the keyring backs it off for it.

    ``waited``: the request timed out after waiting for its turn, never sent (``not_sent``)
    or sent with less than half its time left: not counted against the destination either.
    """

    def __init__(
        self,
        destination: str,
        reason: str,
        *,
        resolver_busy: bool = False,
        abandoned: bool = False,
        not_sent: bool = False,
        waited: bool = False,
    ) -> None:
        self.destination = destination
        self.reason = reason
        self.resolver_busy = resolver_busy
        self.abandoned = abandoned
        self.not_sent = not_sent
        self.waited = waited
        super().__init__(destination, reason)

    def __str__(self) -> str:
        return f"cannot reach {self.destination}: {self.reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(destination={self.destination!r}, reason={self.reason!r})"


class BackoffError(TransportError):
    """The destination failed recently and is not retried before ``retry_at``.

    ``retry_at`` is in the reactor's clock (``reactor.seconds()``);
    ``failures`` counts the consecutive failures behind the back-off.
    """

    def __init__(self, destination: str, retry_at: float, failures: int, now: float) -> None:
        self.retry_at = retry_at
        self.failures = failures
        wait = max(0.0, retry_at - now)
        super().__init__(
            destination,
            f"backing off after {failures} consecutive failure(s); "
            f"next attempt allowed in {wait:.0f} s",
        )


class CancelledBeforeSending(CancelledError):
    """A request cancelled (by its caller) while it waited for its turn behind the requests
    in flight to its destination: it was never sent, the destination never saw it. A
    ``CancelledError``, as any cancelled request's failure; only a caller that must tell
    (the service's ``close``, ``not_sent``) looks further."""


class BlockedAddressError(ConnectionError):
    """Every address we could connect to for a host is in the outbound blocklist."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self.host = host
        self.addresses = addresses
        shown = ", ".join(addresses[:4])
        super().__init__(f"{host} resolves only to blocked addresses ({shown})")
