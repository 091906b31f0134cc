"""One untrusted program, run against its test inputs in a bubblewrap sandbox.

Layout of the sandbox (bwrap, run as root; docs/code_reward.md lists what each part guarantees):
  /opt/python     the interpreter's installation (sys.base_prefix), read-only; its site-packages
                  hidden under an empty tmpfs
  /usr/lib, /usr/lib64 (+ /lib, /lib64 as on the host)  shared libraries, read-only
  /proc /dev      the new pid namespace's proc; a minimal /dev (null, zero, urandom, ...)
  /tmp /home      empty tmpfs, not writable by the program
  /sandbox        the program's directory (cwd): a fresh tmpfs of max_dir_bytes, the only
                  writable place, gone with the sandbox
New pid, network, ipc, uts and cgroup namespaces; --die-with-parent; --new-session; every
capability dropped except setuid/setgid, which the harness uses once to become uid
`uid_base + slot` (so RLIMIT_NPROC counts only that slot's processes) and then loses. The harness
sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_CORE before the
program runs, and a Python audit hook that reports (and blocks) processes, signals, sockets,
native code and file access outside /sandbox. The parent kills the sandbox time_limit_s after
the program started (or startup_grace_s + time_limit_s after the launch, whichever is first) or
when stdout + stderr exceed their cap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from m1jax.rl.rewards.code import harness

HARNESS = pathlib.Path(harness.__file__).read_text(encoding="utf-8")
SANDBOX_DIR = "/sandbox"
SANDBOX_PYTHON = "/opt/python"
RESULTS_CAP_BYTES = 4 << 20  # the result pipe (values returned by the tests)
_READ_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/proc/self")


class SandboxUnavailable(RuntimeError):
  """The sandbox cannot start; nothing was run."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. time_limit_s bounds all its tests together (wall time from the
  program's start, and CPU time); the whole sandbox gets at most startup_grace_s more."""
  time_limit_s: float = 2.0
  memory_mb: int = 256  # RLIMIT_AS
  max_processes: int = 8  # RLIMIT_NPROC of the slot's uid (threads count)
  max_output_bytes: int = 1 << 20  # stdout + stderr
  max_file_bytes: int = 1 << 20  # RLIMIT_FSIZE: largest file the program may write
  max_dir_bytes: int = 16 << 20  # size of the tmpfs that is the program's directory
  # wall seconds for starting bwrap and Python; the time limit counts from the program's start
  startup_grace_s: float = 2.0

  def __post_init__(self):
    for name in ("time_limit_s", "memory_mb", "max_processes", "max_output_bytes",
                 "max_file_bytes", "max_dir_bytes"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
    if self.startup_grace_s < 0:
      raise ValueError(f"startup_grace_s: must be >= 0, got {self.startup_grace_s}")


@dataclasses.dataclass(frozen=True)
class Execution:
  """What came back from one run: the harness's records and how the process ended."""
  records: tuple[dict, ...]  # result-pipe lines (see harness.py)
  killed: str | None  # "timeout" or "output_limit" when the parent killed it, else None
  returncode: int
  output_tail: str  # the last 2000 characters of stdout + stderr
  wall_s: float


def _interpreter(prefix: str) -> str:
  version = f"python{sys.version_info.major}.{sys.version_info.minor}"
  for name in (version, "python3"):
    if os.path.exists(os.path.join(prefix, "bin", name)):
      return name
  raise SandboxUnavailable(f"python_prefix: no bin/{version} or bin/python3 under {prefix!r}")


class Sandbox:
  """Runs programs in bubblewrap (or, with unsafe_no_sandbox, directly: no isolation at all).

  Args:
    bwrap: the bubblewrap executable (a name on PATH or a path).
    python_prefix: the Python installation the programs run with ("" : sys.base_prefix).
    unsafe_no_sandbox: run without bwrap and without the uid change: only the rlimits, the
      audit hook and the wall-time kill remain. Never for untrusted code.
    uid_base: slot s runs as uid uid_base + s.
    audit: install the harness's audit hook (reasons "violation"); False only to test the layers
      beneath it.
  """

  def __init__(self, *, bwrap: str = "bwrap", python_prefix: str = "",
               unsafe_no_sandbox: bool = False, uid_base: int = 61000, audit: bool = True):
    self.bwrap = bwrap
    self.prefix = os.path.realpath(python_prefix or sys.base_prefix)
    self.unsafe = unsafe_no_sandbox
    self.uid_base = uid_base
    self.audit = audit
    self._checked = False
    self._lock = threading.Lock()

  def check(self) -> None:
    """Starts one trivial program; raises SandboxUnavailable (with the reason) when it fails."""
    with self._lock:
      if self._checked:
        return
      if self.unsafe:
        logging.warning("config.code.unsafe_no_sandbox=True: model-generated code runs WITHOUT "
                        "ISOLATION (no namespaces, no read-only filesystem, no uid change)")
      else:
        if shutil.which(self.bwrap) is None:
          raise SandboxUnavailable(
              f"code sandbox: bubblewrap executable {self.bwrap!r} not found (config.code.bwrap); "
              "install it with `make sandbox` (apt-get install -y bubblewrap), or set "
              "config.code.unsafe_no_sandbox=True to run model code without isolation")
        if os.geteuid() != 0:
          raise SandboxUnavailable(
              "code sandbox: runs as root (it gives each program its own unprivileged uid); "
              f"this process has uid {os.geteuid()}")
      execution = self._run("def f():\n  return 1\n", "f", [[]], Limits(time_limit_s=5.0), 0)
      if [r.get("value") for r in execution.records if "test" in r] != [1]:
        raise SandboxUnavailable(
            f"code sandbox: {self.bwrap} could not run a trivial program (exit "
            f"{execution.returncode}, records {execution.records}): {execution.output_tail}")
      self._checked = True

  def run(self, program: str, entry_point: str, tests: list[list], limits: Limits,
          slot: int = 0) -> Execution:
    """Runs `program`, then `entry_point(*args)` for each args list of `tests`, in a fresh
    directory that is gone afterwards. Slots must not be used concurrently."""
    self.check()
    return self._run(program, entry_point, tests, limits, slot)

  def _command(self, workdir: str, limits: Limits) -> tuple[list[str], str, list[str]]:
    """(argv, the program's working directory as it sees it, its read-only roots). Sandboxed,
    that directory is a fresh tmpfs of limits.max_dir_bytes; `workdir` is used unsafe only."""
    python = _interpreter(self.prefix)
    if self.unsafe:
      return ([os.path.join(self.prefix, "bin", python)], workdir,
              [self.prefix, "/usr", "/lib", "/lib64", *_READ_DEVICES])
    argv = [self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            # parents of mount points are created 0700 otherwise: the program's uid needs x on them
            "--perms", "0755", "--dir", "/usr", "--perms", "0755", "--dir", "/opt"]
    roots = [SANDBOX_PYTHON]
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32"):
      if os.path.islink(path):
        argv += ["--symlink", os.readlink(path), path]
      elif os.path.isdir(path):
        argv += ["--ro-bind", path, path]
      else:
        continue
      roots.append(path)
    argv += ["--ro-bind", self.prefix, SANDBOX_PYTHON]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.isdir(os.path.join(self.prefix, "lib", version, "site-packages")):
      argv += ["--tmpfs", f"{SANDBOX_PYTHON}/lib/{version}/site-packages"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/home",
             "--size", str(limits.max_dir_bytes), "--perms", "1777", "--tmpfs", SANDBOX_DIR,
             "--chdir", "/", "--clearenv",
             "--setenv", "HOME", "/home", "--setenv", "PATH", "/usr/bin",
             f"{SANDBOX_PYTHON}/bin/{python}"]
    return argv, SANDBOX_DIR, roots + list(_READ_DEVICES)

  def _run(self, program, entry_point, tests, limits: Limits, slot: int) -> Execution:
    workdir = tempfile.mkdtemp(prefix="m1jax-code-")
    read_fd, write_fd = os.pipe()
    try:
      argv, inner_dir, read_roots = self._command(workdir, limits)
      uid = None if self.unsafe else self.uid_base + slot
      job = dict(program=program, entry_point=entry_point, tests=tests, uid=uid,
                 workdir=inner_dir, read_roots=read_roots, audit=self.audit, results_fd=write_fd,
                 limits=dict(cpu_s=math.ceil(limits.time_limit_s), memory_mb=limits.memory_mb,
                             processes=limits.max_processes, file_bytes=limits.max_file_bytes))
      argv = argv + ["-I", "-S", "-B", "-c", HARNESS]
      env = {"PATH": "/usr/bin:/bin", "HOME": workdir} if self.unsafe else {}
      start = time.monotonic()
      process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, pass_fds=(write_fd,), cwd=workdir,
                                 env=env, start_new_session=True)
      os.close(write_fd)
      write_fd = None
      deadline = start + limits.time_limit_s + limits.startup_grace_s
      results, output, killed = self._drain(process, json.dumps(job).encode(), read_fd, deadline,
                                            limits)
      returncode = process.wait()
      records = []
      for line in results.decode("utf-8", "replace").splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # the program wrote to the result pipe: ignored
        if isinstance(record, dict):
          records.append(record)
      return Execution(tuple(records), killed, returncode,
                       output[-2000:].decode("utf-8", "replace"), time.monotonic() - start)
    finally:
      if write_fd is not None:
        os.close(write_fd)
      os.close(read_fd)
      shutil.rmtree(workdir, ignore_errors=True)

  @staticmethod
  def _drain(process, job: bytes, read_fd, deadline, limits: Limits):
    """Writes the job to stdin, reads the result pipe and stdout/stderr until they close and the
    process ends; kills its process group at the deadline or when a cap is exceeded. Returns
    (results bytes, the tail of the output, killed reason or None)."""
    results, output, output_bytes, killed, started = bytearray(), bytearray(), 0, None, False
    selector = selectors.DefaultSelector()
    selector.register(process.stdin, selectors.EVENT_WRITE, "job")
    selector.register(read_fd, selectors.EVENT_READ, "results")
    selector.register(process.stdout, selectors.EVENT_READ, "output")
    selector.register(process.stderr, selectors.EVENT_READ, "output")
    try:
      while selector.get_map() and not killed:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          killed = "timeout"
          break
        for key, _ in selector.select(timeout=remaining):
          if key.data == "job":  # PIPE_BUF bytes at a time never block once writable
            try:
              sent = os.write(key.fd, job[:select.PIPE_BUF])
            except BrokenPipeError:
              sent = len(job)
            job = job[sent:]
            if not job:
              selector.unregister(key.fileobj)
              process.stdin.close()
            continue
          fd = key.fd if key.data == "results" else key.fileobj.fileno()
          chunk = os.read(fd, 1 << 16)
          if not chunk:
            selector.unregister(key.fileobj)
          elif key.data == "results":
            results += chunk
            if not started and harness.STARTED.encode() in results:
              started = True  # from now on the program has time_limit_s
              deadline = min(deadline, time.monotonic() + limits.time_limit_s)
            if len(results) > RESULTS_CAP_BYTES:
              killed = "output_limit"
          else:
            output_bytes += len(chunk)
            output = (output + chunk)[-4096:]
            if output_bytes > limits.max_output_bytes:
              killed = "output_limit"
      if not killed:  # every pipe closed: the process is ending (or hangs without them)
        try:
          process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
          killed = "timeout"
    finally:
      selector.close()
      if process.poll() is None:
        try:
          os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    return bytes(results), bytes(output), killed
