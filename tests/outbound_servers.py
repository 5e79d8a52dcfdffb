"""A private Postfix with a submission listener built from `filterd postfix-config --submission`.

Test-only (the lead may move it to tests/servers/ with the other launchers). The
submission service and its cleanup come from ``filterd.outbound.postfix.submission_recipe``
for the installed Postfix version, adapted only where a private instance must differ:
a loopback port instead of ``submission``, no chroot, the header_checks file in the
instance's own directory, and no TLS/SASL lines (the tests authenticate with
``XCLIENT LOGIN=...`` from loopback, which sets the same ``{auth_authen}`` macro).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filterd.outbound.postfix import Recipe, installed_version, submission_recipe
from tests.servers import PostfixServer, free_port


class SubmissionPostfix(PostfixServer):
    def __init__(self, workdir: Path, sink_port: int, **kwargs: Any) -> None:
        super().__init__(workdir, sink_port, **kwargs)
        self.submission_port = free_port()
        self.recipe: Recipe = submission_recipe(
            installed_version() or (3, 7, 0),
            listen=f"127.0.0.1:{self.submission_port}",
            chroot="n",
            header_checks=str(Path(workdir).absolute() / "conf" / "submission_header_checks"),
            tls=False,
            sasl=False,
        )

    def _write_config(self) -> None:
        super()._write_config()
        for path, text in self.recipe.files.items():
            Path(path).write_text(text)
        master = self.confdir / "master.cf"
        master.write_text(master.read_text() + self.recipe.master_cf())
        self._age_config()
