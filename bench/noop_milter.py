#!/usr/bin/env python3
"""A do-nothing pymilter milter: what any Python milter can reach on this machine.

Same negotiation as filterd (no-reply header/body events, DATA with a reply) and one
process, accepting every message at end of message; the bench compares filterd with it.

    noop_milter.py unix:/path/milter.sock
"""

from __future__ import annotations

import os
import sys

import Milter


class Noop(Milter.Base):  # type: ignore[misc]
    @Milter.noreply
    def connect(self, *args: object) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, *args: object) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, *args: object) -> int:
        return Milter.CONTINUE

    def envrcpt(self, *args: object) -> int:
        return Milter.CONTINUE

    def data(self) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, *args: object) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        return Milter.ACCEPT


def main() -> None:
    socket_name = sys.argv[1]
    os.umask(0)  # Postfix's smtpd (user postfix) must be able to write to the socket
    Milter.factory = Noop
    Milter.set_flags(Milter.ADDHDRS)
    # The bench's DaemonProcess waits for this line, as it does for filterd's.
    print('{"msg": "milter ready"}', file=sys.stderr, flush=True)
    Milter.runmilter("noop", socket_name, 600)


if __name__ == "__main__":
    main()
