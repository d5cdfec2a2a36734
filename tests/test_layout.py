"""The layout is the architecture: imports point one way, and a plain (non-editable) install works.

pipeline/ holds the stages and the DIP module; eval/ and launch/ are libraries the stages use and
never import a stage. A wheel built from this checkout, installed into a fresh virtual
environment, finds its templates (DeepSpeed configs, the sbatch file) as package data and runs
from a directory outside the checkout.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Modules of dipnet.pipeline that are stages (or the CLI over them); eval/ and launch/ may use
# the rest (settings, errors, readers, outputs, model loading, the DIP module, the generator).
STAGES = {"run", "base_model", "convert", "data", "train", "export", "report", "smoothness", "cli", "plots"}


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, node.lineno))
            if node.module == "dipnet.pipeline":
                out += [(f"dipnet.pipeline.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


@pytest.mark.parametrize("package", ["eval", "launch"])
def test_libraries_never_import_a_stage(package):
    bad = []
    for path in sorted((REPO / package).glob("*.py")):
        for mod, line in _imports(path):
            parts = mod.split(".")
            if parts[:2] == ["dipnet", "pipeline"] and len(parts) > 2 and parts[2] in STAGES:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_train_and_export_depend_on_the_checkpoint_module_not_on_each_other():
    """One home for the checkpoint format (pipeline/checkpoint.py) and one for model set-up
    (pipeline/model_setup.py): the two stages that read checkpoints never import each other."""
    for a, b in (("train", "export"), ("export", "train")):
        mods = [m for m, _ in _imports(REPO / "pipeline" / f"{a}.py")]
        assert f"dipnet.pipeline.{b}" not in mods, f"pipeline/{a}.py imports pipeline/{b}.py"
    for lib in ("checkpoint", "model_setup"):
        mods = {m.split(".")[2] for m, _ in _imports(REPO / "pipeline" / f"{lib}.py") if m.startswith("dipnet.pipeline.")}
        assert not mods & STAGES, (lib, mods & STAGES)


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build a wheel, install it non-editable into a fresh venv (the pinned packages come from the
    project venv through a path entry, so nothing is downloaded), and use it from /tmp."""
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(dist.glob("dipnet-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # The pinned stack from the project venv, as a plain path entry: its .pth files (among them
    # the editable install of this checkout) are not processed, so `dipnet` comes from the wheel.
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "zz_project_deps.pth").write_text(deps + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    recipe = work / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny-arith.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    dipnet = venv / "bin" / "dipnet"

    where = subprocess.run([str(py), "-c", "import dipnet.launch, dipnet.pipeline; print(dipnet.launch.__file__); "
                            "print(dipnet.pipeline.__file__)"], cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout

    res = subprocess.run([str(dipnet), "validate", str(recipe)], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "ok (6 training run(s)" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([str(dipnet), "launch", str(recipe), "--slurm", "--dry-run", "--nodes", "2"], cwd=work,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --nodes=2" in res.stdout and "-m dipnet.pipeline.cli run" in res.stdout
    res = subprocess.run([str(py), "-c", "import json; from dipnet.launch.ds_config import build_ds_config; "
                          "from dipnet.pipeline.recipe import TrainSettings; "
                          "print(json.dumps(build_ds_config(TrainSettings(zero_stage=3), 2)))"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads(res.stdout)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 16
