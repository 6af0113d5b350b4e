"""What the federation client's and the keyring's per-server back-offs share."""

from __future__ import annotations

__all__ = ["is_failure_status"]


def is_failure_status(status: int) -> bool:
    """Whether a server's HTTP error answer counts as a failure that backs it off.

    A 5xx: the server (or its proxy) is in trouble. A 401: it will not accept our
    requests for a while. A 429: it is rate-limiting us, so we limit ourselves. Any
    other answer proves it up and answering. As Synapse's ``RetryDestinationLimiter``
    (synapse/util/retryutils.py).
    """
    return status >= 500 or status in (401, 429)
