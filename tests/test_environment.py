"""constraints.txt (written by `make lock`) pins every requirement of setup.py, so `make demo`
and `make test` install the versions the documented numbers were measured with; `make test` also
installs bubblewrap (the code reward's sandbox) where it is missing."""

import ast
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _setup_requirements() -> dict[str, list[str]]:
  with open(os.path.join(ROOT, "setup.py")) as f:
    tree = ast.parse(f.read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and
              getattr(n.func, "attr", None) == "setup")
  keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
  return {"runtime": keywords["install_requires"], **keywords["extras_require"]}


def test_every_requirement_is_pinned():
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  pins = dict(line.split("==") for line in lines)
  assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", line) for line in lines)
  pins = {_name(k): v for k, v in pins.items()}
  for group, requirements in _setup_requirements().items():
    for requirement in requirements:
      assert _name(requirement) in pins, f"{group} requirement {requirement!r}: run `make lock`"
  assert "pip" in pins  # make's first install step upgrades pip to the pinned version


def test_make_targets_install_from_the_constraints():
  with open(os.path.join(ROOT, "Makefile")) as f:
    makefile = f.read()
  assert "INSTALL := $(PY) -m pip install -q -c constraints.txt" in makefile
  runtime = re.search(r"^\$\(VENV\)/\.installed-runtime:.*?\n\n", makefile, re.M | re.S).group(0)
  assert "$(INSTALL) -e .\n" in runtime and "[test]" not in runtime  # the demo: runtime only
  assert re.search(r"^demo: \$\(VENV\)/\.installed-runtime", makefile, re.M)
  assert re.search(r"^test: \$\(VENV\)/\.installed-test", makefile, re.M)


def _make_sandbox(tmp_path, with_bwrap: bool) -> str:
  """Runs `make sandbox` with a PATH of stand-ins: a recording apt-get, and bwrap or not."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  log = tmp_path / "apt.log"
  (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  (bin_dir / "apt-get").chmod(0o755)
  (bin_dir / "id").symlink_to(shutil.which("id"))
  if with_bwrap:
    (bin_dir / "bwrap").write_text("#!/bin/sh\n")
    (bin_dir / "bwrap").chmod(0o755)
  subprocess.run([shutil.which("make"), "-s", "-C", ROOT, "sandbox"], check=True,
                 env={"PATH": str(bin_dir)}, capture_output=True)
  return log.read_text() if log.exists() else ""


def test_make_test_installs_bubblewrap_only_where_it_is_missing(tmp_path):
  with open(os.path.join(ROOT, "Makefile")) as f:
    assert re.search(r"^test: .*\bsandbox\b", f.read(), re.M)
  assert _make_sandbox(tmp_path / "present", with_bwrap=True) == ""
  calls = _make_sandbox(tmp_path / "missing", with_bwrap=False)
  assert calls.splitlines() == ["update -qq", "install -y -qq bubblewrap"]
