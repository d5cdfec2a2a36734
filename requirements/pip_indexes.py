"""Print the uv arguments for the package indexes pip is configured with (`pip config list`:
its config files and PIP_* variables), so `make install`'s uv finds the same packages pip would.

uv reads none of pip's configuration. `--index-strategy unsafe-best-match` is pip's own rule:
the best version across every index; uv's default takes a package from the first index that
has it at all, and fails where a later one holds the pinned version. Run with the Python whose
pip configuration applies; with no index settings it prints only the strategy.
"""

import ast
import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def uv_index_args(config_list: str) -> list[str]:
    settings = {}  # name -> locations; pip's order of precedence: install over global, PIP_* over both
    for rank in ("global", "install", ":env:"):
        for line in config_list.splitlines():
            key, sep, value = line.partition("=")
            section, _, name = key.rpartition(".")
            if sep and section == rank and name in FLAGS:
                settings[name] = ast.literal_eval(value).split()  # pip prints repr(value); lists are whitespace-separated
    return [arg for name, locations in settings.items() for location in locations
            for arg in (FLAGS[name], location)] + ["--index-strategy", "unsafe-best-match"]


if __name__ == "__main__":
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    print(shlex.join(uv_index_args(listed)))
