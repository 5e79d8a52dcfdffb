"""The Postfix half of "no trace of the sender's IP": a recipe, and a check of it.

Postfix writes its own ``Received: from host [IP] ... with ESMTPSA`` line and
hides it from milters, so filterd cannot remove it. Postfix ≥ 3.10 drops the
client part itself with ``smtpd_hide_client_session = yes`` on the submission
service. Older versions (Debian 12 ships 3.7) get a cleanup service used only by
the submission service, whose ``header_checks`` (a ``regexp:`` table: no
postfix-pcre needed) replace that line with one that names only this server.
Both ``ESMTPA`` (plain text, e.g. XCLIENT or an internal webmail) and
``ESMTPSA`` (TLS) are matched.

``submission_recipe`` builds the lines; ``filterd postfix-config --submission``
prints them; ``submission_leaks`` reads a main.cf/master.cf pair and says what
would still leak (``filterd check --postfix`` calls it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

Version = tuple[int, int, int]
HIDE_SESSION_SINCE: Version = (3, 10, 0)

DEFAULT_HEADER_CHECKS = "/etc/postfix/filterd_submission_header_checks"
CLEANUP_SERVICE = "filterd_subcleanup"
DAEMON_NAME = "submission"

# One logical header; regexp tables see continuation lines joined with newlines, and
# POSIX "." matches a newline. The last "by HOST (Postfix) with ESMTP[S]A" is the
# submission hop; everything before it (the client's name and IP) is dropped.
HEADER_CHECKS = (
    "# filterd: remove the submitting client's name and IP from Postfix's own Received:\n"
    "# line (ESMTPA = plain text, ESMTPSA = TLS). Used only by the submission cleanup.\n"
    "/^Received:[[:space:]]+from[[:space:]].*[[:space:]](by[[:space:]]+[^[:space:]]+"
    "[[:space:]]+\\(Postfix\\)[[:space:]]+with[[:space:]]+ESMTPS?A[[:space:]].*)$/\n"
    "    REPLACE Received: $1\n"
)


def parse_version(text: str) -> Version:
    numbers = [int(n) for n in re.findall(r"\d+", text)[:3]]
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


def installed_version(config_dir: str | None = None) -> Version | None:
    """``postconf -h mail_version`` of the installed Postfix, or None without one."""
    postconf = shutil.which("postconf") or (
        "/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None
    )
    if postconf is None:
        return None
    cmd = [postconf, *(["-c", config_dir] if config_dir else []), "-h", "mail_version"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        out = subprocess.run(
            [postconf, "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    return parse_version(out.stdout) if out.stdout.strip() else None


@dataclass(frozen=True)
class Service:
    """One master.cf entry: the service line and its ``-o name=value`` overrides."""

    name: str
    type: str
    chroot: str
    command: str
    options: tuple[tuple[str, str], ...] = ()
    maxproc: str = "-"

    def lines(self) -> list[str]:
        head = f"{self.name} {self.type} n - {self.chroot} - {self.maxproc} {self.command}"
        return [head, *(f"  -o {k}={v}" for k, v in self.options)]

    def postconf_m(self) -> str:
        """The ``postconf -M`` form (one line, no -o options)."""
        return (
            f"postconf -M '{self.name}/{self.type}={self.name} {self.type} n - "
            f"{self.chroot} - {self.maxproc} {self.command}'"
        )

    def postconf_p(self) -> list[str]:
        return [f"postconf -P '{self.name}/{self.type}/{k}={v}'" for k, v in self.options]


@dataclass(frozen=True)
class Recipe:
    version: Version
    services: tuple[Service, ...]
    files: Mapping[str, str] = field(default_factory=dict)
    main_cf: Mapping[str, str] = field(default_factory=dict)

    @property
    def hides_session(self) -> bool:
        return self.version >= HIDE_SESSION_SINCE

    def master_cf(self) -> str:
        return "\n".join(line for s in self.services for line in s.lines()) + "\n"

    def render(self, style: str = "files") -> str:
        v = ".".join(str(n) for n in self.version)
        out = [f"# filterd submission recipe for Postfix {v}"]
        if self.hides_session:
            out.append("# Postfix >= 3.10: smtpd_hide_client_session drops the client's name")
            out.append("# and IP from the Received: line of the submission service.")
        else:
            out.append("# Postfix < 3.10: a cleanup service used only by submission replaces")
            out.append("# the Received: line with ESMTPA/ESMTPSA by one without the client.")
        out.append("# The milter (filterd) removes X-Originating-IP and similar headers.")
        for path, text in self.files.items():
            out += ["", f"# ---- file {path}", text.rstrip("\n")]
        if style == "postconf":
            out += ["", "# ---- commands"]
            out += [f"postconf -e '{k} = {v}'" for k, v in self.main_cf.items()]
            for service in self.services:
                out += [service.postconf_m(), *service.postconf_p()]
            out.append("postfix reload")
        else:
            if self.main_cf:
                out += ["", "# ---- main.cf"]
                out += [f"{k} = {v}" for k, v in self.main_cf.items()]
            out += ["", "# ---- master.cf", self.master_cf().rstrip("\n")]
        return "\n".join(out) + "\n"


def submission_recipe(
    version: Version,
    *,
    listen: str = "submission",
    chroot: str = "y",
    header_checks: str = DEFAULT_HEADER_CHECKS,
    milter: str | None = None,
    tls: bool = True,
    sasl: bool = True,
) -> Recipe:
    """The submission service (and its cleanup on Postfix < 3.10) for ``version``.

    ``tls``/``sasl``: the usual submission settings (encrypt, SASL auth, only
    authenticated clients). A test that authenticates with XCLIENT turns them
    off; the privacy settings stay exactly as printed.
    """
    options: list[tuple[str, str]] = [("syslog_name", "postfix/submission")]
    if tls:
        options.append(("smtpd_tls_security_level", "encrypt"))
    if sasl:
        options += [
            ("smtpd_sasl_auth_enable", "yes"),
            ("smtpd_client_restrictions", "permit_sasl_authenticated,reject"),
            ("smtpd_relay_restrictions", "permit_sasl_authenticated,reject"),
        ]
    # Never put the login into the Received: line either.
    options.append(("smtpd_sasl_authenticated_header", "no"))
    options.append(("milter_macro_daemon_name", DAEMON_NAME))
    if milter:
        options.append(("smtpd_milters", milter))
    services: list[Service] = []
    files: dict[str, str] = {}
    if version >= HIDE_SESSION_SINCE:
        options.append(("smtpd_hide_client_session", "yes"))
    else:
        options.append(("cleanup_service_name", CLEANUP_SERVICE))
        files[header_checks] = HEADER_CHECKS
    services.append(Service(listen, "inet", chroot, "smtpd", tuple(options)))
    if version < HIDE_SESSION_SINCE:
        services.append(
            Service(
                CLEANUP_SERVICE,
                "unix",
                chroot,
                "cleanup",
                (("header_checks", f"regexp:{header_checks}"),),
                maxproc="0",
            )
        )
    return Recipe(version, tuple(services), files)


# ---- checking an existing configuration ----------------------------------------------


def parse_main_cf(text: str) -> dict[str, str]:
    """main.cf as name -> value (continuation lines joined; no $name expansion)."""
    values: dict[str, str] = {}
    current: str | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[:1].isspace() and current is not None:
            values[current] += " " + raw.strip()
            continue
        name, sep, value = raw.partition("=")
        if sep:
            current = name.strip()
            values[current] = value.strip()
    return values


def parse_master_cf(text: str) -> list[Service]:
    services: list[Service] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[:1].isspace() and services:
            words = raw.split()
            last = services[-1]
            opts = list(last.options)
            for i, word in enumerate(words):
                if word == "-o" and i + 1 < len(words):
                    key, _, value = words[i + 1].partition("=")
                    opts.append((key, value))
                elif word.startswith("-o") and len(word) > 2:
                    key, _, value = word[2:].partition("=")
                    opts.append((key, value))
            services[-1] = Service(last.name, last.type, last.chroot, last.command, tuple(opts))
            continue
        words = raw.split()
        if len(words) >= 8:
            services.append(Service(words[0], words[1], words[4], words[7]))
    return services


def _is_submission(service: Service) -> bool:
    opts = dict(service.options)
    port = service.name.rsplit(":", 1)[-1]
    return (
        service.type == "inet"
        and service.command == "smtpd"
        and (
            port in ("submission", "submissions", "587", "465")
            or opts.get("smtpd_sasl_auth_enable") == "yes"
        )
    )


_POSIX_CLASSES = {"[:space:]": r"\s", "[:alnum:]": "a-zA-Z0-9", "[:alpha:]": "a-zA-Z",
                  "[:digit:]": "0-9"}  # fmt: skip


def _rule_matches_both(table: str) -> str | None:
    """Why a header_checks table does not cover ESMTPA and ESMTPSA, or None if it does."""
    kind, _, path = table.partition(":")
    if kind not in ("regexp", "pcre"):
        return f"header_checks {table} is not a regexp:/pcre: table"
    try:
        text = Path(path).read_text()
    except OSError:
        return f"cannot read header_checks table {path}"
    samples = [
        "Received: from pc.example.net (unknown [192.0.2.77])\n\tby mx.example.org (Postfix) "
        f"with {proto} id 4Qx1; Tue, 1 Dec 2026 22:00:00 +0000 (UTC)"
        for proto in ("ESMTPA", "ESMTPSA")
    ]
    logical: list[str] = []
    for raw in text.splitlines():  # a line starting with whitespace continues the previous
        if raw[:1].isspace() and logical:
            logical[-1] += " " + raw.strip()
        elif raw.strip() and not raw.startswith("#"):
            logical.append(raw)
    for line in logical:
        match = re.match(r"^/(.*)/[a-zA-Z]*\s+(IGNORE|REPLACE)\b(.*)$", line)
        if match is None:
            continue
        pattern = match.group(1)
        for posix, python in _POSIX_CLASSES.items():
            pattern = pattern.replace(posix, python)
        try:
            regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        except re.error:
            continue
        if all(regex.search(s) for s in samples):
            return None
    return f"header_checks {path} has no rule removing Received: lines with ESMTPA and ESMTPSA"


def _text_of(source: str | Path) -> str:
    """A Path, or a str naming an existing file (one line, no newline), is read; other str
    values are the file's text."""
    if isinstance(source, str) and ("\n" in source or not source or not Path(source).is_file()):
        return source
    return Path(source).read_text()


def submission_leaks(
    main_cf: str | Path, master_cf: str | Path, version: Version | None = None
) -> list[str]:
    """Warnings (empty when fine) about submission services that would leak the client IP.

    ``main_cf``/``master_cf``: file paths (``Path``, or a ``str`` naming a file) or
    their text. ``version``: the Postfix version (default: the installed one; 3.7 if
    none is installed).
    """
    main_text, master_text = _text_of(main_cf), _text_of(master_cf)
    version = version or installed_version() or (3, 7, 0)
    main = parse_main_cf(main_text)
    services = parse_master_cf(master_text)
    subs = [s for s in services if _is_submission(s)]
    if not subs:
        return ["no submission service (port 587/465 or SASL-enabled smtpd) in master.cf"]
    warnings: list[str] = []
    by_name = {s.name: s for s in services if s.type == "unix"}
    for sub in subs:
        opts = dict(sub.options)
        where = f"master.cf service {sub.name}"

        def setting(name: str, opts: dict[str, str] = opts) -> str:
            return opts.get(name, main.get(name, ""))

        if not setting("smtpd_milters").strip():
            warnings.append(f"{where}: no smtpd_milters, so X-Originating-IP is not removed")
        if setting("smtpd_sasl_authenticated_header") == "yes":
            warnings.append(f"{where}: smtpd_sasl_authenticated_header = yes puts the login "
                            "into the Received: line")  # fmt: skip
        if version >= HIDE_SESSION_SINCE and setting("smtpd_hide_client_session") == "yes":
            continue
        cleanup_name = opts.get("cleanup_service_name", main.get("cleanup_service_name", "cleanup"))
        cleanup = by_name.get(cleanup_name)
        table = ""
        if cleanup is not None:
            table = dict(cleanup.options).get("header_checks", "")
        table = table or main.get("header_checks", "")
        hint = (
            "set -o smtpd_hide_client_session=yes"
            if version >= HIDE_SESSION_SINCE
            else "see `filterd postfix-config --submission`"
        )
        if not table:
            warnings.append(f"{where}: Postfix's Received: line keeps the client IP ({hint})")
            continue
        problem = _rule_matches_both(table)
        if problem:
            warnings.append(f"{where}: {problem} ({hint})")
    return warnings
