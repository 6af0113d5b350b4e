"""Prometheus metrics (the ``metrics`` extra): invites in and out, latency, key fetches.

``InviteMetrics`` is what the services call; without ``prometheus-client``
installed (or without a registry) every call is a no-op, so metrics cost
nothing when off. Each ``InviteMetrics`` has its own ``CollectorRegistry``,
served at ``/metrics`` on the ``metrics.listen`` endpoint by the web layer
(``web.metrics.build_metrics_root``), or wherever an embedder mounts
``FederationInvite.metrics_resource()``.

Metrics (labels in brackets):

- ``federation_invite_inbound_invites_total`` (outcome: accepted, ignored, repeated,
  refused, cancelled; errcode): invites received and what became of them. Every
  ``PUT .../invite/{roomId}/{eventId}`` is counted once: ``refused`` with our errcode
  for any error answer, including the body checks (413 ``M_TOO_LARGE``,
  ``M_NOT_JSON``, ``M_BAD_JSON``), the daemon's ``FederationSite`` refusing it before
  the endpoint runs (413 ``M_TOO_LARGE``; 408 or 400 ``M_UNKNOWN``) and an unexpected
  failure (500 ``M_UNKNOWN``);
  ``cancelled`` (errcode empty) when the client went away before its answer (its
  request still arriving included, or abandoned by a drain);
- ``federation_invite_inbound_invite_seconds``: time to answer an invite (histogram);
- ``federation_invite_key_fetches_total``, ``federation_invite_key_fetch_failures_total``:
  key fetches started, and those that yielded no usable key;
- ``federation_invite_outbound_invites_total`` (outcome, errcode): invites we sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .core.errors import Codes

__all__ = ["METRICS_OFF", "NEEDS_THE_EXTRA", "InviteMetrics", "metrics_available"]

#: The errcodes kept as metric labels (ours, and the ones peers answer invites with).
_KNOWN_ERRCODES = frozenset(
    value for name, value in vars(Codes).items() if name.isupper() and isinstance(value, str)
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: Why ``exposition`` (and the resources serving it) fail: counting was not asked for,
#: or ``prometheus-client`` is missing.
METRICS_OFF = (
    "metrics are off: build_from_config and build_components count with metrics=True "
    "(the daemon: with metrics.listen set)"
)
NEEDS_THE_EXTRA = (
    "metrics need the 'metrics' extra (prometheus-client): pip install 'federation-invite[metrics]'"
)


def metrics_available() -> bool:
    """Whether ``prometheus-client`` (the ``metrics`` extra) is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class InviteMetrics:
    """Counters for the services; pass ``enabled=False`` (or lack the extra) for no-ops."""

    def __init__(self, *, enabled: bool = True) -> None:
        available = metrics_available()
        self.enabled = enabled and available
        #: Why ``exposition`` fails when not ``enabled``.
        self.off_reason = METRICS_OFF if not enabled else None if available else NEEDS_THE_EXTRA
        self._key_sources: list[Callable[[], tuple[int, int]]] = []
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self._inbound = Counter(
            "federation_invite_inbound_invites",
            "Invites received, by outcome and errcode",
            ["outcome", "errcode"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "federation_invite_inbound_invite_seconds",
            "Time to answer an invite",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._outbound = Counter(
            "federation_invite_outbound_invites",
            "Invites sent, by outcome and errcode",
            ["outcome", "errcode"],
            registry=self.registry,
        )
        self.registry.register(_KeyFetchCollector(self._key_sources))

    def inbound(self, outcome: str, errcode: str | None, seconds: float) -> None:
        """Count one received invite (``accepted``, ``ignored``, ``repeated``, ``refused`` or
        ``cancelled``) and its latency; ``errcode`` only for refusals, always one of ours.

        A negative latency (the wall clock stepped back meanwhile) is observed as 0 s, so
        that the histogram's sum never decreases."""
        if self.enabled:
            self._inbound.labels(outcome, errcode or "").inc()
            self._latency.observe(max(0.0, seconds))

    def outbound(self, outcome: str, errcode: str | None = None) -> None:
        """Count one invite we sent (accepted, refused, invalid_answer, not_sent, transport).

        The errcode comes from the peer: unknown ones are counted as ``other``,
        so that no peer can create a time series per invite.
        """
        if errcode is not None and errcode not in _KNOWN_ERRCODES:
            errcode = "other"
        if self.enabled:
            self._outbound.labels(outcome, errcode or "").inc()

    def watch_key_fetches(self, source: Callable[[], tuple[int, int]]) -> None:
        """Report a keyring's ``(fetches, failures)`` counters, read at scrape time."""
        self._key_sources.append(source)

    def check_enabled(self) -> None:
        """A ``RuntimeError`` saying why, unless counting (``off_reason``)."""
        if self.off_reason is not None:
            raise RuntimeError(self.off_reason)

    def exposition(self) -> tuple[bytes, bytes]:
        """``(content type, body)``: the registry in Prometheus' text exposition format
        (served at ``/metrics`` by ``web.metrics``); a ``RuntimeError`` when off."""
        self.check_enabled()
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body: bytes = generate_latest(self.registry)
        return CONTENT_TYPE_LATEST.encode("ascii"), body


class _KeyFetchCollector:
    """Reads the keyrings' own counters when scraped (no coupling from the keyring to us)."""

    def __init__(self, sources: list[Callable[[], tuple[int, int]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        fetches = sum(source()[0] for source in self._sources)
        failures = sum(source()[1] for source in self._sources)
        yield CounterMetricFamily(
            "federation_invite_key_fetches", "Key fetches started", value=fetches
        )
        yield CounterMetricFamily(
            "federation_invite_key_fetch_failures",
            "Key fetches that yielded no usable key",
            value=failures,
        )
