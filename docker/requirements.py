"""Print the requirements of pyproject.toml that an image on `BASE_IMAGE` still needs, one a line.

    python requirements.py pyproject.toml > requirements.txt

torch is never listed: the base image's build (CUDA, NCCL, and the Transformer Engine and apex
compiled against it) stays. Neither is a package the base already has in any version: the base's
numpy and friends are the ones its torch was built and tested with. What is kept is reported on
stderr. Standard library only (Python >= 3.11 for tomllib).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata

KEEP_FROM_BASE = {"torch"}


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement, e.g. 'PyYAML==6.0' -> 'pyyaml'."""
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(requirements: list[str]) -> list[str]:
    """The requirements the running Python does not satisfy by name (versions are the base's)."""
    missing = []
    for requirement in requirements:
        name = requirement_name(requirement)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in KEEP_FROM_BASE:
                raise SystemExit(f"requirements.py: the base image has no {name}; use a base image that brings "
                                 f"its own {name} (BASE_IMAGE), as this image never installs it.") from None
            missing.append(requirement)
        else:
            print(f"requirements.py: keeping the base image's {name} {have} (pyproject.toml: {requirement})",
                  file=sys.stderr)
    return missing


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    with open(path, "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    for requirement in needed(requirements):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
