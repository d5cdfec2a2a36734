"""Shared fixtures: tiny random-init configs of each supported family, and the embedded base.

The tiny base is built once per content hash into DIPNET_CACHE (default ~/.cache/dipnet), so
the whole suite shares one build (about 90 s the first time on 2 cores, then instant).
"""

import os
import sys
from pathlib import Path

import pytest

from dipnet.pipeline.env import omp_wait_for_shared_cores

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and "OMP_WAIT_POLICY" not in os.environ:
    # `make test` runs two workers on the machine's cores: each is the other's busy neighbour.
    os.environ.update(OMP_WAIT_POLICY="PASSIVE", DIPNET_OMP_WAIT="passive: the test suite's workers share the cores")
omp_wait_for_shared_cores()  # before anything imports torch: see its docstring
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def family_configs():
    import transformers as T

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": T.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": T.Qwen2Config(num_key_value_heads=1, **common),
        "mistral": T.MistralConfig(num_key_value_heads=1, **common),
        "gemma2": T.Gemma2Config(num_key_value_heads=1, head_dim=32, **common),
        "gemma3_text": T.Gemma3TextConfig(num_key_value_heads=1, head_dim=32, **common),
        "gemma3": T.Gemma3Config(
            text_config=dict(num_key_value_heads=1, head_dim=32, **common),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16), mm_tokens_per_image=4),
        "phi3": T.Phi3Config(num_key_value_heads=2, **common),
        "gpt_neox": T.GPTNeoXConfig(**common),
        "gpt2": T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                             bos_token_id=1, eos_token_id=2),
    }


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3_text", "gemma3", "phi3", "gpt_neox", "gpt2"]


# `make test` runs the suite on two pytest-xdist workers (`--dist load`: tests are handed out a
# few at a time, so both workers may build the same module fixture; keeping a module on one
# worker, `--dist loadfile`, is not yet measured fairly). Fixtures that several workers may want
# are built once under a file lock (`built_for_the_session` below, and the caches of the tiny
# base and SmolLM2). The Slurm tests of both workers share the one cluster (its nodes take two
# test jobs each: tests/slurm_cluster.sh).

# Tests that mostly wait on Slurm's clocks (a requeue's hold, SlurmdTimeout, a time limit): about
# 2 minutes each with the cores nearly idle. In file order two of them ran side by side, one on
# each worker, and the machine idled: sampled from /proc/stat, 0.04 to 1.0 of its 2 cores were
# busy for 2 minutes. Spread through the order, the other worker computes while one waits.
WAITING_ON_SLURM = ("test_requeue_mid_training_resumes_to_the_same_weights",
                    "test_a_node_dies_mid_training_and_the_job_resumes_to_the_same_weights",
                    "test_time_limit_signal_saves_and_requeues")


def pytest_collection_modifyitems(config, items):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return  # one process: the order does not matter
    waiting = [item for item in items if item.name in WAITING_ON_SLURM]
    rest = [item for item in items if item.name not in WAITING_ON_SLURM]
    for k, item in enumerate(waiting):  # at 1/4, 2/4 and 3/4 of the order (every worker computes the same)
        rest.insert(round(len(rest) * (k + 1) / (len(waiting) + 1)), item)
    items[:] = rest


def shared_tmp(tmp_path_factory, name: str) -> Path:
    """A directory every xdist worker of this session sees (the plain session's own otherwise)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def built_for_the_session(tmp_path_factory, name: str, build) -> Path:
    """`build(dir)` once for the whole session, whichever worker asks first; returns `dir`.
    `--dist load` may hand one module's tests to both workers, and a module fixture was then
    trained on each (the gradient-checkpointing runs, 40 s of CPU twice, in a fresh-clone CI).
    The other worker now waits for the first's build and reads it: treat it as read-only."""
    import shutil

    from dipnet.pipeline.outputs import built_once

    root = shared_tmp(tmp_path_factory, name)
    out, complete = root / "built", root / "complete"

    def once():
        if out.exists():  # a build that failed half-way
            shutil.rmtree(out)
        out.mkdir()
        build(out)
        complete.touch()

    built_once(out, complete.is_file, once)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs("28m")` mounts a small file system of that size (root only: the test is skipped
    elsewhere) and returns its path; every mount is removed when the test ends."""
    import subprocess

    mounts = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounts)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_base_dir():
    """The embedded tiny base (cached by content hash)."""
    import torch

    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.recipe import TinyBaseSettings

    torch.set_num_threads(2)
    return tiny_base(TinyBaseSettings(), seed=0, progress=False)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_base_dir):
    """A briefly fine-tuned (60 steps, 2 ranks, ZeRO-2, DIP), exported tiny model, shared by the
    evaluation tests and the EOS test: read it, never write into it."""
    from trainhelp import train

    from dipnet.pipeline.export import export_checkpoint

    def build(root):
        train(root / "run", {"train.max_steps": 60, "train.save_every": 60, "train.zero_stage": 2,
                             "dip.method": "dip", "train.micro_batch_size": 8})
        export_checkpoint(root / "run", root / "export")

    return built_for_the_session(tmp_path_factory, "evalmodel", build) / "export"


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `dipnet` CLI in a subprocess; returns CompletedProcess."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dipnet.pipeline.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def cli_in_process(*args, cwd=None, env=None):
    """Run `dipnet ARGS` in this process (same CompletedProcess-like result as run_cli). For tests
    of what a command does, not of process behaviour (signals, exit codes of a killed child):
    a new process pays ~5-10 s of imports (torch, transformers) that this one has already paid."""
    import contextlib
    import io
    import subprocess

    from dipnet.pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["dipnet", *map(str, args)], rc, out.getvalue(), err.getvalue())


def write_recipe(tmp_path, name: str, base: dict, extra: dict | None = None) -> Path:
    """A recipe file from `base` sections (+ `extra` section updates), run directory tmp_path/name."""
    import json

    import yaml

    raw = json.loads(json.dumps(base))
    raw["run"] = {"name": name, "output_dir": str(tmp_path / name), **raw.get("run", {})}
    raw["run"]["output_dir"] = str(tmp_path / name)
    for k, v in (extra or {}).items():
        raw.setdefault(k, {}).update(v)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p
