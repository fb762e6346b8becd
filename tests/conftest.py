"""Shared fixtures and the rule that kernel tests may skip only where BPF cannot run.

A test marked ``kernel`` needs root, bcc and a kernel that loads BPF; one marked
``image`` needs those and podman with the agent's image (`make image`). Where the
machine cannot, it is skipped -- unless ``TAPIO_REQUIRE_KERNEL_TESTS=1`` is set
(``.ci/run`` sets it), in which case the missing capability is a failure.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def _bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc's Python module is not importable (install python3-bpfcc)"
    if not os.path.isdir("/sys/kernel/tracing/events"):
        return "tracefs is not mounted at /sys/kernel/tracing"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


def _image_unavailable_reason() -> str | None:
    reason = _bpf_unavailable_reason()
    if reason is not None:
        return reason
    image = os.environ.get("TAPIO_IMAGE", "localhost/tapio-agent:dev")
    try:
        found = subprocess.run(["podman", "image", "exists", image], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman does not run ({exc}); `make image` installs it and builds the image"
    return None if found else f"podman has no image {image}: `make image` builds it"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs root and real BPF on this machine")
    config.addinivalue_line("markers", "image: runs the agent's image with podman (root, real BPF, `make image`)")
    # The tests' own BPF programs compile against the same headers the agent's do.
    from tapio_core.bpf import use_kernel_headers

    use_kernel_headers()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "image" in item.keywords:
        reason = _image_unavailable_reason()
    elif "kernel" in item.keywords:
        reason = _bpf_unavailable_reason()
    else:
        return
    if reason is None:
        return
    if os.environ.get("TAPIO_REQUIRE_KERNEL_TESTS") == "1":
        pytest.fail(f"kernel test cannot run here but is required: {reason}", pytrace=False)
    pytest.skip(reason)
