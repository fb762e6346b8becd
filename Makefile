# Tapio: `make run` sets up this machine and starts the agent; `make test` sets up and runs every test.
# Set-up is idempotent and quick when already done. Needs root (apt, BPF, mounts).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KERNEL := $(shell uname -r)
APT_PACKAGES := python3-bpfcc linux-headers-amd64 nftables bpftool iproute2 libatomic1 kmod util-linux
# Every plugin folder with a pyproject.toml is a distribution: a new plugin needs no edit here.
DISTRIBUTIONS := . $(patsubst %/pyproject.toml,%,$(sort $(wildcard plugins/*/pyproject.toml plugins/sinks/*/pyproject.toml)))
PYPROJECTS := $(addsuffix /pyproject.toml,$(DISTRIBUTIONS))
AGENT_ARGS ?= --sink stdout --sink file

.PHONY: setup system venv run test bench lint clean

setup: system venv

# Debian packages, kernel headers where bcc looks for them, tracefs.
system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@headers=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1); \
	if [ -z "$$headers" ]; then echo "no linux-headers-*-amd64 under /usr/src" >&2; exit 1; fi; \
	if [ ! -e /lib/modules/$(KERNEL)/build/Makefile ]; then \
		mkdir -p /lib/modules/$(KERNEL); \
		ln -sfn $$headers /lib/modules/$(KERNEL)/build; \
		ln -sfn $${headers%-amd64}-common /lib/modules/$(KERNEL)/source; \
	fi
	@if [ ! -d /sys/kernel/tracing/events ]; then mount -t tracefs tracefs /sys/kernel/tracing; fi

# A venv with every distribution of this repository installed editable, and bcc linked in.
venv: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc
	$(BIN)/pip install -q --disable-pip-version-check $(foreach d,$(DISTRIBUTIONS),-e $(d)) -e '.[test]'
	@touch $@

run: setup
	$(BIN)/tapio-agent $(AGENT_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/run.py

lint: venv
	$(BIN)/ruff check tapio_core plugins tests bench

clean:
	rm -rf $(VENV)
