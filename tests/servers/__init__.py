"""Real servers for tests and bench: everything ``from tests.servers import X`` needs.

The product's own launchers (private Redis and clamd, which ``filterd serve`` starts) live in
``filterd.services``; the servers only tests and bench need (Postfix, rbldnsd, smtp-sink, a
silent UDP port, an SMTP client, config writers) live here. Bench scripts put the repository
root on ``sys.path`` to import this package.

Facts measured on Debian 12 (Postfix 3.7.11, ClamAV 1.4.6, Redis 7.0.15, rbldnsd 1.0pre
20210120), as root, on a 2-core machine:

* Start-up to first answer (median of 5, 20 ms poll): Redis 0.02 s, clamd with the tiny project
  DB 0.02 s (a full official database is reported to need tens of seconds and ~1 GB), rbldnsd
  0.07 s (the first probe is lost before the bind), smtp-sink 0.02 s, Postfix 0.4 s
  (``postfix start`` runs its integrity checks); stopping Postfix takes 0.5-1 s.
* Every Postfix program waits while main.cf is younger than ~2 s (re-reading it every 0.3 s):
  a freshly written config made each start take 2.5 s. The config files are backdated.
* clamd appends ``.UNOFFICIAL`` to every signature that is not from a signed official database:
  the project's ``Eicar-Test-Signature`` is reported as ``Eicar-Test-Signature.UNOFFICIAL``.
* rbldnsd answers REFUSED for zones it does not serve *and* for zones whose data failed to load
  ("zone will not be serviced"), so readiness waits for NOERROR/NXDOMAIN from the first zone.
  ``$TTL n`` in a data file sets that dataset's TTL; ``-t n`` sets the default for the others.
  rbldnsd can log every query (``-l +file``, unbuffered); that log is how queries are counted.
* smtp-sink's ``-d`` dump holds the envelope (X-Mail-Args / X-Rcpt-Args headers) ahead of the
  message; the message is stored with LF line ends, dot-unstuffed, plus one trailing empty line.
  The dump file is opened at MAIL and written until ".", so only files smtp-sink no longer
  holds open (checked in /proc) count as delivered.
* Postfix's readiness probe (one connection reading the 220 banner) is seen by a configured
  milter as one connection that ends without a message.
* ``smtpd_peername_lookup = no``: otherwise smtpd would reverse-resolve each client address
  through /etc/resolv.conf, which points off the machine. With it, an XCLIENT session with
  ADDR but no NAME shows as ``unknown[ADDR]`` and sends no DNS packet (checked with strace).
* Postfix commands print their errors only when stderr is a terminal (else they go to syslog,
  absent here, and ``postfix start`` fails with no message at all): they run with a pty.
* With an unreachable milter and ``milter_default_action = tempfail`` the banner is still 220;
  the session gets ``451 4.7.1 Service unavailable`` at MAIL FROM.
* A Postfix master is not our child and PID 1 here does not reap it: after ``postfix stop``
  it stays a zombie, so liveness is read from /proc (state Z = gone).
"""

from __future__ import annotations

from filterd.services.clamd import ClamdServer, project_signature_dir
from filterd.services.launcher import (
    LOOPBACK,
    ServerStartError,
    free_port,
    make_reachable,
    wait_for_tcp,
)
from filterd.services.redis import RedisServer
from tests.servers.config import dbl_uribl, toml_value, write_config, zen_dnsbl
from tests.servers.postfix import PostfixServer
from tests.servers.rbldnsd import DnsQuery, LoopbackUdp, RbldnsdServer, SilentUdpServer
from tests.servers.smtp import SinkMessage, SmtpReply, SmtpResult, SmtpSink, send_mail

# Names clamd reports for the project's own database (rules/clamav-sigs/filterd-test.ndb):
# clamd appends ".UNOFFICIAL" to signatures that do not come from a signed official database.
EICAR_SIGNATURE_NAME = "Eicar-Test-Signature.UNOFFICIAL"
TEST_VIRUS_SIGNATURE_NAME = "Filterd.Test.Virus.UNOFFICIAL"

__all__ = [
    "EICAR_SIGNATURE_NAME",
    "LOOPBACK",
    "TEST_VIRUS_SIGNATURE_NAME",
    "ClamdServer",
    "DnsQuery",
    "LoopbackUdp",
    "PostfixServer",
    "RbldnsdServer",
    "RedisServer",
    "ServerStartError",
    "SilentUdpServer",
    "SinkMessage",
    "SmtpReply",
    "SmtpResult",
    "SmtpSink",
    "dbl_uribl",
    "free_port",
    "make_reachable",
    "project_signature_dir",
    "send_mail",
    "toml_value",
    "wait_for_tcp",
    "write_config",
    "zen_dnsbl",
]
