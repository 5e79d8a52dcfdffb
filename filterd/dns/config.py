"""The [dns] section: the one resolver (cache, breaker, pool) both list checks share.

Built once per configuration load into the shared services
(``Services.resolver``), so the DBL answers uribl needs are cached once with
dnsbl's, and one ``nameservers`` setting points every list check at the same
server. [dnsbl] and [uribl] still accept the resolver keys for older
configurations: a section that sets any of them gets a resolver of its own,
with a logged deprecation warning.
"""

from __future__ import annotations

from filterd.dns.lists import ResolverKeys

SECTION = "dns"


class Config(ResolverKeys):
    """Every key of ``ResolverKeys``; defaults are those the list sections had."""
