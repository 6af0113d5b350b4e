"""The pure protocol core: no reactor, no I/O, no Deferreds.

Everything about the invite exchange that can be decided without the network
lives here: room versions, identifiers, canonical JSON, hashes, redaction, event
IDs, signatures and the X-Matrix header.
"""
