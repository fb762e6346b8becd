# Tapio: `make run` sets up this machine and starts the agent; `make test` sets up and runs every test.
# Set-up is idempotent and quick when already done. Needs root (apt, BPF, mounts).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3-bpfcc libbpf1 linux-headers-amd64 nftables bpftool iproute2 libatomic1 kmod util-linux
# Every plugin folder with a pyproject.toml is a distribution: a new plugin needs no edit here.
DISTRIBUTIONS := . $(patsubst %/pyproject.toml,%,$(sort $(wildcard plugins/*/pyproject.toml plugins/sinks/*/pyproject.toml)))
PYPROJECTS := $(addsuffix /pyproject.toml,$(DISTRIBUTIONS))
AGENT_ARGS ?= --sink stdout --sink file
# What boots the matrix's guest kernels: qemu (emulation: nested KVM does not boot stock kernels
# here) and busybox for virtme-ng's initramfs; virtme-ng itself is in the venv (test extras).
GUEST_PACKAGES := qemu-system-x86 busybox-static
# What builds and runs the agent's image (runc: crun refuses this host's mixed cgroup v1/v2).
IMAGE_PACKAGES := podman runc debootstrap
# bcc's own tools, measured beside the observers by `make bench`.
BENCH_PACKAGES := bpfcc-tools
MATRIX := PATH=$(abspath $(BIN)):$$PATH $(BIN)/python kernels/matrix.py
# Where the kernel tests leave what they measured (kernels/support.py writes the README's table from it).
MATRIX_OUT := .tapio-matrix

# apt-get installs those of the Debian packages $(1) that are missing; quick when none is.
install_missing = missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing: $$missing"; apt-get update -qq \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

.PHONY: setup system headers guests image prometheus venv run test test-kernels bench soak lint clean

setup: system venv headers

# Debian packages and tracefs. The kernel headers are Tapio's own (see venv), never linked into
# the host's /lib/modules: any recent headers serve, as struct offsets come from BTF.
system:
	@$(call install_missing,$(APT_PACKAGES))
	@if [ ! -d /sys/kernel/tracing/events ]; then mount -t tracefs tracefs /sys/kernel/tracing; fi

# A venv with every distribution of this repository installed editable, and bcc linked in.
venv: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc
	$(BIN)/pip install -q --disable-pip-version-check $(foreach d,$(DISTRIBUTIONS),-e $(d)) -e '.[test]'
	@touch $@

# Tapio's own kernel headers beside the venv (tapio_core.bpf.BUNDLED_HEADERS), from linux-headers-amd64.
headers: system venv
	@deploy/kernel-headers.sh $(VENV)/share/tapio/kernel-headers

# Debian's own 5.10, 6.1 and 6.12 kernels, unpacked into a cache (kernels/fetch.sh), and what boots them.
guests: system venv
	@$(call install_missing,$(GUEST_PACKAGES))
	kernels/fetch.sh

# The agent's image, built with podman on a debootstrap base (deploy/build-image.sh); tests/test_image.py runs it.
image: system
	@$(call install_missing,$(IMAGE_PACKAGES))
	deploy/build-image.sh

# Debian's Prometheus server for tests/test_metrics_kernel.py: unpacked into a cache, never installed as a service.
PROMETHEUS_CACHE := $(HOME)/.cache/tapio/prometheus
prometheus: system
	@test -x $(PROMETHEUS_CACHE)/root/usr/bin/prometheus || { mkdir -p $(PROMETHEUS_CACHE) && cd $(PROMETHEUS_CACHE) \
		&& apt-get download -qq prometheus 2>/dev/null && dpkg-deb -x prometheus_*.deb root && rm -f prometheus_*.deb; }

run: setup
	$(BIN)/tapio-agent $(AGENT_ARGS)

# The whole suite on this machine's kernel (the image's run included), then in a guest of each kernel of
# the matrix: the portability scenario (every observer, every anomaly type, doctor against the agent), the
# default exit policy, and the healthy and broken nodes (what an operator is told).
GUEST_TESTS := tests/test_portability_kernel.py tests/test_exit_policy_kernel.py tests/test_noise_kernel.py \
               tests/test_drops_kernel.py
test: setup guests image prometheus
	rm -rf $(MATRIX_OUT)
	TAPIO_MATRIX_OUT=$(MATRIX_OUT)/host/tests $(BIN)/python -m pytest --junitxml=$(MATRIX_OUT)/host/junit.xml $(PYTEST_ARGS)
	$(MATRIX) --out $(MATRIX_OUT) -- $(GUEST_TESTS) $(PYTEST_ARGS)
	$(BIN)/python kernels/support.py $(MATRIX_OUT) README.md

# Every real-kernel test on this machine's kernel and in a guest of each kernel of the matrix
# (under emulation the whole suite takes 40-70 minutes per guest kernel).
test-kernels: setup guests prometheus
	rm -rf $(MATRIX_OUT)
	TAPIO_MATRIX_OUT=$(MATRIX_OUT)/host/tests $(BIN)/python -m pytest -m kernel --junitxml=$(MATRIX_OUT)/host/junit.xml $(PYTEST_ARGS)
	$(MATRIX) --timeout 7200 --out $(MATRIX_OUT) -- -m kernel $(PYTEST_ARGS)
	$(BIN)/python kernels/support.py $(MATRIX_OUT) README.md

bench: setup
	@$(call install_missing,$(BENCH_PACKAGES))
	$(BIN)/python bench/run.py

# The agent for ten minutes under mixed real load (bench/soak.py; not in CI): nothing may grow after warm-up.
SOAK_S ?= 600
soak: setup
	$(BIN)/python bench/soak.py $(SOAK_S)

lint: venv
	$(BIN)/ruff check tapio_core plugins tests bench kernels

clean:
	rm -rf $(VENV)
