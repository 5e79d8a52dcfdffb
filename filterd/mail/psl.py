"""The one public-suffix list of the process (``publicsuffixlist``'s shipped copy).

Loading the list costs ~50 ms and ~10 MB; the link extractor, the URI
blocklist, the allowlist's alignment rules and (at merge) the classifier's
features all cut names at the same suffixes, so they share this instance.
Never downloaded: the list ships inside the package.
"""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=1)
def psl() -> PublicSuffixList:
    """The shared instance (thread-safe to read)."""
    return PublicSuffixList()


@lru_cache(maxsize=16384)
def private_suffix(name: str) -> str | None:
    """``www.shop.example.co.uk`` -> ``example.co.uk``; None when ``name`` is itself a suffix.

    ``name`` must already be a normalised lower-case DNS name. Cached: link domains repeat
    across messages of one campaign.
    """
    result = psl().privatesuffix(name)
    return result if isinstance(result, str) else None


def is_public(name: str) -> bool:
    return bool(psl().is_public(name))


def organizational_domain(domain: str) -> str:
    """The registrable domain (``mail.example.co.uk`` -> ``example.co.uk``), for alignment."""
    return private_suffix(domain) or domain
