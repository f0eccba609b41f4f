"""Install an mlx-openai-server release on Linux CPU into a venv, by the recipe of COMPONENTS.md.

    python tests/install_mlx_server.py VENV VERSION [--drop NAME ...] [--add REQ ...]

Releases from 1.7 on require `mflux`, whose Linux build needs the CUDA mlx, and `torchvision`, which
crashes the server at import on the CPU torch. So: download the wheel without its dependencies, read
its `Requires-Dist` list from the wheel's METADATA (never a hard-coded copy), drop the named
requirements (default: mflux, torchvision), ask for `mlx[cpu]` instead of `mlx` (same version
specifier), add the extra requirements (default: torch==2.13.0, the CPU wheel on this machine's
disk), install those, then the wheel itself with `--no-deps`. Standard library only; the venv is
created with this interpreter when it does not exist.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import re
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

DEFAULT_DROP = ("mflux", "torchvision")
DEFAULT_ADD = ("torch==2.13.0",)
PIP_QUIET = ("--quiet", "--disable-pip-version-check")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: Path) -> list[str]:
    """The `Requires-Dist` lines of the wheel's METADATA, without extras-only ones."""
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(
            n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1
        )
        text = archive.read(metadata_name).decode()
    message = email.parser.Parser().parsestr(text, headersonly=True)
    requirements = []
    for requirement in message.get_all("Requires-Dist") or []:
        marker = requirement.partition(";")[2]
        if re.search(r"\bextra\s*==", marker):
            continue  # an optional extra: not part of the base install
        requirements.append(requirement.strip())
    return requirements


def adapt(requirements: list[str], drop: set[str], add: list[str]) -> list[str]:
    """Drop the named requirements, make `mlx` the CPU build, append `add`."""
    result = []
    for requirement in requirements:
        match = NAME.match(requirement)
        if match is None:
            raise SystemExit(f"cannot parse requirement {requirement!r}")
        name, extras, rest = match.groups()
        if canonical(name) in drop:
            continue
        if canonical(name) == "mlx":
            wanted = {e.strip() for e in (extras or "[]")[1:-1].split(",") if e.strip()}
            extras = "[" + ",".join(sorted(wanted | {"cpu"})) + "]"
        result.append(f"{name}{extras or ''}{rest}")
    return result + list(add)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("version")
    parser.add_argument("--drop", action="append", help="requirement names to leave out")
    parser.add_argument("--add", action="append", help="requirements to add")
    parser.add_argument("--dry-run", action="store_true", help="print the list, install nothing")
    args = parser.parse_args(argv)
    drop = {canonical(n) for n in (args.drop if args.drop is not None else DEFAULT_DROP)}
    add = args.add if args.add is not None else list(DEFAULT_ADD)

    if not (args.venv / "bin" / "python").exists():
        venv.create(args.venv, with_pip=True)
    pip = [str(args.venv / "bin" / "python"), "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="mlx-openai-server-") as tmp:
        spec = f"mlx-openai-server=={args.version}"
        subprocess.run([*pip, "download", *PIP_QUIET, "--no-deps", "-d", tmp, spec], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        requirements = adapt(wheel_requirements(wheel), drop, add)
        print(f"{wheel.name}: installing", " ".join(requirements), flush=True)
        if args.dry_run:
            return 0
        subprocess.run([*pip, "install", *PIP_QUIET, *requirements], check=True)
        subprocess.run([*pip, "install", *PIP_QUIET, "--no-deps", str(wheel)], check=True)
    # nothing may bring a dropped requirement (torchvision) back in through another dependency
    listed = subprocess.run(
        [*pip, "list", "--disable-pip-version-check", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    present = sorted(drop & {canonical(p["name"]) for p in json.loads(listed.stdout)})
    if present:
        subprocess.run([*pip, "uninstall", *PIP_QUIET, "-y", *present], check=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(f"install_mlx_server.py: {' '.join(error.cmd)} failed (exit {error.returncode})")
