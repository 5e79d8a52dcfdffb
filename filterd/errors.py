"""The exceptions filterd raises on purpose, in one small tree.

Catch ``FilterdError`` to handle "filterd refused or could not do this, with a
message meant for the operator"; anything else escaping is a bug. Messages
name the file, section, key or server concerned, never message content.

    FilterdError
    ├── ConfigError        the configuration cannot be used (file, section, key)
    │                      (records' SchemaError: the retention schema file)
    ├── InvalidValue       a value an operator or user gave is malformed; also a
    │                      ValueError, so pydantic validators report it per key
    │                      (AddressError, PatternError)
    ├── DependencyError    a server filterd needs is missing, down or answering
    │                      nonsense (ClamdError and its kinds, RedisNotConfigured)
    └── CheckBuildError    a configured check could not be created

Other owners' roots (the classifier's ModelError, the allowlist's EntryError,
LimitError and ApiConfigError) are meant to derive from these too.
"""

from __future__ import annotations


class FilterdError(Exception):
    """Root of every exception filterd raises on purpose."""


class ConfigError(FilterdError):
    """The configuration cannot be used; the message names the file, section and key."""


class InvalidValue(FilterdError, ValueError):
    """A malformed value (an address, a pattern, an entry) given by an operator or user."""


class DependencyError(FilterdError):
    """A server filterd needs is missing, down, or answering something unusable."""


class CheckBuildError(FilterdError):
    """A configured check could not be created (bad config, missing model...)."""
