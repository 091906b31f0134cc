"""Runs inside the sandbox: limits itself, drops to its own uid, then runs one program's tests.

Standard library only: `sandbox.py` passes this file's text to `python -I -S -B -c` (nothing of
the repository is visible in the sandbox). stdin holds the job:
{"program", "entry_point", "tests": [[args...], ...], "limits": {...}, "uid", "workdir",
"read_roots", "audit", "results_fd"}; the expected outputs never enter the sandbox, so a program cannot forge
a pass by writing to the result pipe (it can only report values, which the parent compares).

Writes JSON lines to the result pipe (the job's "results_fd"):
  {"started": true}                     the program is about to run (its time limit starts)
  {"violation": "<event> <detail>"}     the audit hook blocked a forbidden action (written at once)
  {"setup": "<reason>", "detail": ...}  the program did not define a callable entry point
  {"test": i, "value": <json>}          test i returned this value
  {"test": i, "reason": ..., "detail"}  test i raised (reason "memory" or "crash")
  {"done": true}
"""

import errno
import json
import os
import resource
import sys

RESULTS_FD = 3  # replaced by the job's "results_fd"
STARTED = '{"started": true}'

# Events that are forbidden whatever their arguments (processes, signals, network, native code).
FORBIDDEN_EVENTS = frozenset((
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
    "os.killpg", "os.startfile", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer",
    "ctypes.call_function", "ctypes.addressof", "sys.remote_exec", "os.chroot",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents"))
FORBIDDEN_MODULES = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"))
# Events whose path arguments must lie in the working directory (they change the filesystem).
WRITE_PATH_EVENTS = frozenset((
    "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink",
    "os.link", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr",
    "os.removexattr", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
    "shutil.move", "shutil.chown", "shutil.unpack_archive", "shutil.make_archive"))
# Events whose path arguments must lie in the working directory or a read root.
READ_PATH_EVENTS = frozenset(("os.listdir", "os.scandir", "os.listxattr", "os.getxattr",
                              "glob.glob", "glob.glob/2"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _write(line: str) -> None:
  try:
    os.write(RESULTS_FD, (line + "\n").encode())
  except OSError:  # the program closed the pipe: the parent sees no results
    pass


def _report(record: dict) -> None:
  _write(json.dumps(record))


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip("/") + "/")


def make_audit_hook(workdir: str, read_roots):
  """A sys.addaudithook hook that reports and blocks anything outside the program's remit."""

  def where(value):
    if isinstance(value, int) or value is None:
      return None
    try:
      return os.path.normpath(os.path.join(workdir, os.fsdecode(value)))
    except TypeError:
      return None

  def allowed(path, write):
    return path is None or _inside(path, workdir) or (
        not write and any(_inside(path, root) for root in read_roots))

  def violation(event, detail):
    _report({"violation": f"{event} {detail}"[:300]})
    raise PermissionError(f"sandbox: {event} is not allowed")

  def hook(event, args):
    if event in FORBIDDEN_EVENTS:
      violation(event, repr(args)[:200])
    elif event == "import":
      if args[0].split(".")[0] in FORBIDDEN_MODULES:
        violation(event, args[0])
    elif event == "open":
      path, mode, flags = args
      write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
      if not allowed(where(path), write):
        violation(event, f"{path!r} mode={mode!r}")
    elif event in WRITE_PATH_EVENTS or event in READ_PATH_EVENTS:
      write = event in WRITE_PATH_EVENTS
      for arg in args:
        if isinstance(arg, (str, bytes, os.PathLike)) and not allowed(where(arg), write):
          violation(event, repr(arg))

  return hook


def _set_limits(limits: dict) -> None:
  mib = 1 << 20
  cpu = int(limits["cpu_s"])  # SIGXCPU (reason "timeout") at the soft limit
  for name, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                      (resource.RLIMIT_AS, (limits["memory_mb"] * mib,) * 2),
                      (resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2),
                      (resource.RLIMIT_NPROC, (limits["processes"],) * 2),
                      (resource.RLIMIT_NOFILE, (64, 64)),
                      (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(name, value)


def _reason(error: BaseException) -> str:
  if isinstance(error, MemoryError):
    return "memory"
  if isinstance(error, OSError) and error.errno in (errno.EFBIG, errno.ENOSPC):
    return "output_limit"  # a file over RLIMIT_FSIZE (Python ignores SIGXFSZ), a full directory
  return "crash"


def _detail(error: BaseException) -> str:
  try:
    return f"{type(error).__name__}: {error}"[:300]
  except BaseException:  # a program's exception whose __str__ fails
    return type(error).__name__


def _exit() -> None:
  """Ends the process without the program's atexit handlers, after flushing what it printed."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # a closed or replaced stream
      pass
  os._exit(0)


def main() -> None:
  job = json.loads(sys.stdin.buffer.read())
  global RESULTS_FD
  RESULTS_FD = job["results_fd"]
  _set_limits(job["limits"])
  if job["uid"] is not None:  # root in the sandbox (no user namespace): become the slot's uid
    os.setgroups([])
    os.setgid(job["uid"])
    os.setuid(job["uid"])
  os.chdir(job["workdir"])
  program, tests = job["program"], job["tests"]
  if job["audit"]:
    sys.addaudithook(make_audit_hook(job["workdir"], tuple(job["read_roots"])))
  namespace = {"__name__": "__program__", "__builtins__": __builtins__}
  _write(STARTED)  # the parent's time limit counts from here
  try:
    exec(compile(program, "<program>", "exec"), namespace)  # noqa: S102 -- the sandbox's job
    fn = namespace.get(job["entry_point"])
    if not callable(fn):
      raise NameError(f"the program defines no function {job['entry_point']!r}")
  except BaseException as e:
    _report({"setup": _reason(e), "detail": _detail(e)})
    _exit()
  for i, args in enumerate(tests):
    try:
      line = json.dumps({"test": i, "value": fn(*args)})
    except BaseException as e:  # includes a value that is not JSON (reason "crash")
      line = json.dumps({"test": i, "reason": _reason(e), "detail": _detail(e)})
    _write(line)
  _report({"done": True})
  _exit()


if __name__ == "__main__":
  main()
