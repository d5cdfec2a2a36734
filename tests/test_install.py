"""`make install` hands pip's configured indexes to uv (requirements/pip_indexes.py): the same
packages pip would find, in pip's order of precedence."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pip_indexes", ROOT / "requirements" / "pip_indexes.py")
pip_indexes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_indexes)


def test_pip_settings_become_uv_arguments_in_pips_precedence():
    listed = "\n".join([
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.index-url='https://mirror.example/simple'",
        "global.find-links='/opt/wheels'",
        "install.find-links='/srv/wheels'",  # [install] over [global]
        ":env:.index-url='https://env.example/simple'",  # PIP_INDEX_URL over both
        "user.index-url='https://ignored.example/simple'",  # not a pip section name
    ])
    assert pip_indexes.uv_index_args(listed) == [
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--index-url", "https://env.example/simple", "--find-links", "/srv/wheels",
        "--index-strategy", "unsafe-best-match"]
    assert pip_indexes.uv_index_args("") == ["--index-strategy", "unsafe-best-match"]


def test_the_script_reads_this_machines_pip_configuration():
    env_url = "https://pip-indexes-test.invalid/simple"
    out = subprocess.run([sys.executable, str(ROOT / "requirements" / "pip_indexes.py")], capture_output=True,
                         text=True, check=True, env={**os.environ, "PIP_INDEX_URL": env_url}).stdout.split()
    assert out[out.index("--index-url") + 1] == env_url and out[-2:] == ["--index-strategy", "unsafe-best-match"]
