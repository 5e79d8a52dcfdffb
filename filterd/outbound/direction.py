"""Which way a message goes: direction is evidence, decided once per transaction.

Outbound means the client authenticated with SASL (Postfix's ``{auth_authen}``,
already in ``Envelope.auth_user``) or the connection arrived on a Postfix
service listed in ``[outbound] services`` (its ``{daemon_name}``, set per
service with ``-o milter_macro_daemon_name=NAME``; Postfix sends
``{daemon_name}`` at connect with its default ``milter_connect_macros``).

For an authenticated submission the envelope handed to checks and records
carries no client IP and no client host name: nothing downstream needs them
(rate limits are per login, client-IP blocklists do not apply), so nothing
downstream can store them.
"""

from __future__ import annotations

from dataclasses import replace

from filterd.outbound.config import Config
from filterd.types import Envelope

INBOUND = "inbound"
OUTBOUND = "outbound"


def direction_of(envelope: Envelope, config: Config) -> str:
    if not config.enabled:
        return INBOUND
    if config.authenticated and envelope.auth_user:
        return OUTBOUND
    if envelope.daemon_name and envelope.daemon_name in config.services:
        return OUTBOUND
    return INBOUND


def prepare(envelope: Envelope, config: Config) -> Envelope:
    """The envelope with its direction set; authenticated submissions lose the client IP."""
    direction = direction_of(envelope, config)
    if direction == INBOUND:
        return replace(envelope, direction=INBOUND)
    if envelope.auth_user:
        return replace(envelope, direction=OUTBOUND, client_ip=None, client_name=None)
    return replace(envelope, direction=OUTBOUND)
