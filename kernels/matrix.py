"""Run a command (the real-kernel tests) in guests that boot Debian's own kernels.

    python kernels/matrix.py [--kernels 5.10,6.1] [--timeout S] [--out DIR] -- pytest ARGS...

Each kernel named in ``kernels/kernels.txt`` (fetched by ``kernels/fetch.sh`` into the cache)
boots under virtme-ng over this machine's root file system, one guest at a time, with qemu's
emulation (nested KVM does not boot stock kernels here). The guest runs
``python -m pytest ARGS`` from this repository with ``--junitxml``; the host reads the result
from a shared folder, prints one line per kernel and exits non-zero when any kernel failed.
Everything a guest writes (``guest.log``, ``junit.xml``, what the tests leave in
``TAPIO_MATRIX_OUT``) stays in ``--out/<kernel>/``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KERNELS_LIST = HERE / "kernels.txt"
DEFAULT_CACHE = Path(os.environ.get("TAPIO_KERNEL_CACHE", Path.home() / ".cache/tapio/kernels"))
#: Emulation runs CPU-bound work 10-20 times slower than the host (a bcc compile: 12-18 s);
#: the tests' own waits are multiplied by this in a guest.
GUEST_TIME_SCALE = "12"
LOCK = Path("/tmp/tapio-kernel-matrix.lock")


def matrix_kernels() -> list[str]:
    """Names of the guest kernels, in the order kernels.txt lists them."""
    names = []
    for line in KERNELS_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def prepare_kernel(cache: Path, name: str) -> tuple[Path, str]:
    """The kernel image to boot, and its release. The guest has no kernel headers of its own: bcc
    compiles against Tapio's (in the shared venv, as on a node without headers)."""
    root = cache / name
    image, release_file = root / "vmlinuz", root / "release"
    if not image.exists() or not release_file.exists():
        raise SystemExit(f"matrix: kernel {name} is not in {cache} (run kernels/fetch.sh)")
    release = release_file.read_text().strip()
    modules = root / "lib" / "modules" / release
    for link in (modules / "build", modules / "source"):  # left by older versions of this script
        if link.is_symlink():
            link.unlink()
    return image, release


def vng_command(image: Path, out: Path, command: list[str], memory: str, cpus: int) -> list[str]:
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    return [vng, "--disable-kvm", "--cpus", str(cpus), "-m", memory,
            # The repository is writable in the guest (pytest and Python write caches) but not
            # written back; results go to the shared --rwdir folder.
            "--overlay-rwdir", str(REPO), "--rwdir", str(out),
            "--run", str(image), "--", str(HERE / "guest.sh"), str(out), str(REPO), *command]


def junit_counts(path: Path) -> dict[str, int]:
    """passed/failed/errors/skipped and seconds from pytest's junit XML; empty when it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["time"] = sum(float(s.get("time", 0)) for s in suites)
    return total


def run_guest(name: str, cache: Path, out_root: Path, pytest_args: list[str], timeout: float, memory: str,
              cpus: int) -> tuple[bool, dict[str, int]]:
    image, release = prepare_kernel(cache, name)
    out = out_root / name
    shutil.rmtree(out, ignore_errors=True)
    (out / "tests").mkdir(parents=True)
    env_args = [f"TAPIO_TEST_TIME_SCALE={os.environ.get('TAPIO_TEST_TIME_SCALE', GUEST_TIME_SCALE)}",
                f"TAPIO_MATRIX_OUT={out / 'tests'}", "TAPIO_REQUIRE_KERNEL_TESTS=1", "PYTHONDONTWRITEBYTECODE=1"]
    command = ["env", *env_args, sys.executable, "-m", "pytest",
               f"--junitxml={out / 'junit.xml'}", *pytest_args]
    # One guest at a time on this machine: two emulated guests on 2 cores tripled the time and
    # added failures. Whoever comes second waits here.
    with open(LOCK, "w") as lock, open(out / "vng.log", "wb") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        try:
            subprocess.run(vng_command(image, out, command, memory, cpus), stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
    elapsed = time.monotonic() - started
    status_file = out / "status"
    status = status_file.read_text().strip() if status_file.exists() else None
    counts = junit_counts(out / "junit.xml")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if counts.get(k))
    verdict = ("timed out" if timed_out else "no result (the guest did not finish: see vng.log)" if status is None
               else "ok" if status == "0" else f"exit {status}")
    print(f"kernel {name} ({release}): {verdict}; {summary or 'no tests counted'}; {elapsed:.0f} s", flush=True)
    if status != "0":
        tail = (out / "guest.log").read_text(errors="replace").splitlines()[-40:] if (out / "guest.log").exists() \
            else []
        print("\n".join(f"  | {line}" for line in tail), flush=True)
    return status == "0" and not timed_out, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", help="comma-separated names from kernels/kernels.txt (default: all)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=REPO / ".tapio-matrix")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per guest")
    parser.add_argument("--memory", default="4G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    names = args.kernels.split(",") if args.kernels else matrix_kernels()
    unknown = set(names) - set(matrix_kernels())
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(sorted(unknown))}; kernels.txt has {', '.join(matrix_kernels())}")
    results = [run_guest(name, args.cache, args.out.resolve(), args.pytest_args, args.timeout, args.memory, args.cpus)
               for name in names]
    passed = sum(counts.get("passed", 0) for _, counts in results)
    failed = sum(counts.get("failures", 0) + counts.get("errors", 0) for _, counts in results)
    skipped = sum(counts.get("skipped", 0) for _, counts in results)
    print(f"guest kernels {', '.join(names)}: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
