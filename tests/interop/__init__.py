"""Interoperability with a real Synapse, both directions, over TLS on loopback (issue #9).

Run by ``.ci/interop`` (which installs the pinned Synapse into ``.interop-venv/``
and sets ``FEDERATION_INVITE_INTEROP=1``); skipped by the unit test command.
"""
