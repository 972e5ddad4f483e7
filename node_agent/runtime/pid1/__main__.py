"""Entry point: ``python -I -S <this directory> launch CONFIG.json | container``."""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a directory: make ``node_agent`` importable from the tree holding it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from node_agent.runtime.pid1.launch import container, launch


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "launch":
        return launch(argv[2])
    if len(argv) == 2 and argv[1] == "container":
        return container()
    print("usage: pid1 launch CONFIG.json | container", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
