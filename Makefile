# filterd — set-up, run and test on Debian 12 (as root).
# `make run` and `make test` install everything they need themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := postfix clamav-daemon clamav redis-server rbldnsd libmilter-dev \
                python3-venv python3-dev gcc make systemd
STAMP_DEB  := $(VENV)/.deb-stamp
STAMP_VENV := $(VENV)/.venv-stamp

.PHONY: run test deps venv lint typecheck bench bench-classifier bench-perf clean install

# `make install`: the service on Debian 12 (as root). The tree goes to PREFIX with its own
# virtualenv built from the system's python3; the unit, sysusers and tmpfiles files go to
# systemd's directories; the filterd user and /run/filterd, /var/lib/filterd are created.
# DESTDIR stages everything under another root (no virtualenv, no systemctl there).
PREFIX      ?= /opt/filterd
SYSCONFDIR  ?= /etc
UNITDIR     ?= /etc/systemd/system
SYSTEM_PY   ?= /usr/bin/python3
INSTALL_TREE := filterd rules models allowlists pyproject.toml README.md

run: venv
	$(BIN)/filterd serve

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

deps: $(STAMP_DEB)
$(STAMP_DEB):
	@if ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(STAMP_VENV)
$(STAMP_VENV): $(STAMP_DEB) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check filterd
	$(BIN)/mypy

bench-classifier: venv
	$(BIN)/python bench/classifier_bench.py

bench-perf: venv
	$(BIN)/python bench/perf_bench.py

bench: bench-classifier bench-perf

clean:
	rm -rf $(VENV) var build *.egg-info

install: deps
	install -d $(DESTDIR)$(PREFIX)
	@if [ "$$(realpath -m $(DESTDIR)$(PREFIX))" != "$$(realpath $(CURDIR))" ]; then \
	  cp -a $(INSTALL_TREE) $(DESTDIR)$(PREFIX)/; fi
	install -D -m 0644 packaging/filterd.sysusers $(DESTDIR)/usr/lib/sysusers.d/filterd.conf
	install -D -m 0644 packaging/filterd.tmpfiles $(DESTDIR)/usr/lib/tmpfiles.d/filterd.conf
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)/usr/local/sbin
	sed 's|@PREFIX@|$(PREFIX)|g' packaging/filterd.service > $(DESTDIR)$(UNITDIR)/filterd.service
	sed 's|@PREFIX@|$(PREFIX)|g' packaging/filterd.wrapper > $(DESTDIR)/usr/local/sbin/filterd
	chmod 0755 $(DESTDIR)/usr/local/sbin/filterd
	systemd-sysusers --root=$(or $(DESTDIR),/) $(DESTDIR)/usr/lib/sysusers.d/filterd.conf
	systemd-tmpfiles --create --root=$(or $(DESTDIR),/) $(DESTDIR)/usr/lib/tmpfiles.d/filterd.conf
	@if [ ! -e $(DESTDIR)$(SYSCONFDIR)/filterd/filterd.toml ]; then \
	  install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/filterd; \
	  sed -e 's|^state_dir = "var" |state_dir = "/var/lib/filterd"|' \
	      -e 's|^pidfile = "" |pidfile = "/run/filterd/filterd.pid"|' \
	      rules/filterd.toml > $(DESTDIR)$(SYSCONFDIR)/filterd/filterd.toml; \
	  chgrp filterd $(DESTDIR)$(SYSCONFDIR)/filterd $(DESTDIR)$(SYSCONFDIR)/filterd/filterd.toml \
	    2>/dev/null || true; \
	  chmod 0640 $(DESTDIR)$(SYSCONFDIR)/filterd/filterd.toml; fi
	@if [ -z "$(DESTDIR)" ]; then \
	  test -x $(PREFIX)/.venv/bin/python || $(SYSTEM_PY) -m venv $(PREFIX)/.venv; \
	  $(PREFIX)/.venv/bin/python -m pip install -q --upgrade pip; \
	  $(PREFIX)/.venv/bin/python -m pip install -q -e $(PREFIX); \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	  echo "installed: systemctl enable --now filterd; config in $(SYSCONFDIR)/filterd/filterd.toml"; \
	fi
