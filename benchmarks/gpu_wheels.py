"""What the GPU check needs, what this machine has, and the carried wheels installed where it lacks them.

    python benchmarks/gpu_wheels.py benchmarks/gpu_requirements.txt .gpu-wheels /tmp/site

For each requirement: the installed version, and whether it satisfies the line. A pinned (``==``)
requirement that is missing or does not match is installed from the carried wheel into the target
folder (``pip install --no-index --no-deps --target``: the machine's own packages are left as they
are; put the folder on PYTHONPATH). Anything else that is missing is printed as MISSING: the
check's sections that need it will report it too, and the rest still runs. Always exits 0.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def read_requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line]


def wheel_for(req: Requirement, wheels: Path) -> Path | None:
    name = canonicalize_name(req.name).replace("-", "_")
    for wheel in sorted(wheels.glob("*.whl")):
        if canonicalize_name(wheel.name.split("-")[0]).replace("-", "_") == name:
            return wheel
    return None


def main() -> None:
    requirements, wheels, target = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    to_install = []
    print(f"{'package':16s} {'needed':18s} {'on this machine':16s} action")
    for req in read_requirements(requirements):
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        ok = have is not None and req.specifier.contains(have, prereleases=True)
        pinned = any(spec.operator == "==" for spec in req.specifier)
        if ok:
            action = "use the machine's"
        elif pinned and (wheel := wheel_for(req, wheels)) is not None:
            action = f"install carried {wheel.name}"
            to_install.append(wheel)
        elif pinned:
            action = "MISSING: not carried (run benchmarks/fetch_wheels.sh and carry .gpu-wheels)"
        else:
            action = "MISSING: the machine must have it" if have is None else "MISMATCH: trying the machine's"
        print(f"{req.name:16s} {str(req.specifier) or 'any':18s} {have or '-':16s} {action}")
    if to_install:
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, to_install)],
                              capture_output=True, text=True)
        status = "installed" if proc.returncode == 0 else f"pip failed ({proc.returncode}): {proc.stderr[-500:]}"
        print(f"{len(to_install)} carried wheels -> {target}: {status}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
