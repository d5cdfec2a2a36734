"""Slurm: rendering of multi-node jobs, and real chains on the one-node cluster that
tests/slurm_cluster.sh starts (`.ci/run` starts it; elsewhere these skip with the reason)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, write_recipe

from dipnet.launch import slurm
from dipnet.pipeline.recipe import load_recipe

CONF = REPO / "tests" / ".slurm" / "etc" / "slurm.conf"


def _cluster_up() -> str | None:
    """None if the test cluster answers, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch not installed (run tests/slurm_cluster.sh start)"
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", str(CONF))}
    try:  # with no controller, sinfo retries for ~60 s; a live test cluster answers in under 1 s
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env, timeout=10)
    except subprocess.TimeoutExpired:
        return "no Slurm cluster answers (sinfo timed out after 10 s)"
    if res.returncode != 0 or not res.stdout.strip():
        return f"no Slurm cluster answers (sinfo: {(res.stderr or 'no nodes').strip()[:120]})"
    return None


def need_cluster():
    why = _cluster_up()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must start the Slurm test cluster: {why}")
        pytest.skip(why)
    os.environ.setdefault("SLURM_CONF", str(CONF))


def _args(**kw):
    base = dict(nodes=None, gpus_per_node=None, cpus_per_task=None, partition=None, time=None, account=None,
                launcher=None, hostfile=None, dry_run=True)
    return Namespace(**{**base, **kw})


def test_render_four_nodes_by_eight_gpus(tmp_path):
    raw = yaml.safe_load((REPO / "recipes" / "tiny-arith.yaml").read_text())
    raw["launch"]["slurm"] = {"env": {"NCCL_SOCKET_IFNAME": "ib0", "HF_HOME": "/shared/hf"},
                              "extra_sbatch": ["--qos=high"], "partition": "gpu", "time": "04:00:00"}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(p)
    s = slurm.slurm_settings(recipe, _args(nodes=4, gpus_per_node=8, account="proj"))
    text = slurm.render_job(recipe, tmp_path / "recipe.yaml", tmp_path / "run", "train", "train", s)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --cpus-per-task=32", "export NCCL_SOCKET_IFNAME=ib0", "export HF_HOME=/shared/hf",
                 'nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )', 'export MASTER_ADDR="${head_addr:-${nodes[0]}}"',
                 "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))", "#SBATCH --requeue",
                 "export DIPNET_PROCS_PER_NODE=8", "--only train"]:
        assert line in text, line
    assert "DS_ACCELERATOR" not in text  # GPU nodes
    # NCCL defaults on GPU jobs, below the recipe's own env (which would override them).
    assert "export NCCL_DEBUG=WARN" in text and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert text.index("export NCCL_DEBUG=WARN") < text.index("export NCCL_SOCKET_IFNAME=ib0")
    prep = slurm.render_job(recipe, tmp_path / "recipe.yaml", tmp_path / "run", "preprocess", "base,convert,preprocess", s)
    assert "#SBATCH --nodes=1" in prep and "--gpus-per-node" not in prep

    env = {"SLURM_NNODES": "4", "DIPNET_SLURM_LAUNCHER": "torchrun", "DS_ACCELERATOR": ""}  # a GPU node
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cmd = slurm.slurm_train_command(["--recipe", "r.json", "--out", "/o"], 8)
        assert cmd[:7] == ["srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "bash"]
        inner = cmd[-1]
        for part in ['--nnodes "$SLURM_NNODES"', '--node_rank "$SLURM_NODEID"', "--nproc_per_node 8",
                     '--master_addr "$MASTER_ADDR"', '--master_port "$MASTER_PORT"']:
            assert part in inner, part
        os.environ["DIPNET_SLURM_LAUNCHER"] = "deepspeed"
        inner = slurm.slurm_train_command(["--recipe", "r.json", "--out", "/o"], 8)[-1]
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=8/" > /o/hostfile' in inner
        assert "--launcher slurm" in inner and "--num_gpus 8" in inner and '--master_addr "$MASTER_ADDR"' in inner
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_paper_recipe_jobs_ask_for_memory_and_the_eval_gpus(tmp_path):
    """recipes/paper/qwen2.5-7b.yaml: every job renders --mem from the model's size (read from its
    name here, no hub), the train job's for 8 ranks holding a bf16 7B model each while loading;
    launch.slurm.mem overrides; the eval job asks for eval_gpus, which vLLM then uses as its
    tensor-parallel size as far as the heads divide."""
    from dipnet.eval.vllm_runner import gpu_kwargs

    res = run_cli("launch", "recipes/paper/qwen2.5-7b.yaml", "--slurm", "--dry-run", "launch.slurm.eval_gpus=4",
                  cwd=REPO)
    assert res.returncode == 0, res.stderr
    jobs = dict(zip(["preprocess", "train", "export", "eval"], res.stdout.split("# ---- ")[1:]))
    mem = {k: int(re.search(r"#SBATCH --mem=(\d+)G", v).group(1)) for k, v in jobs.items()}
    # 8 ranks x (2 bytes x 7e9 + 3 GiB) x 1.25 headroom; export verifies in float32; vLLM loads it once.
    assert mem["train"] == math.ceil(1.25 * 8 * (14e9 + 3 * 2**30) / 2**30) == 161
    assert mem["export"] > mem["eval"] and all(v >= 4 for v in mem.values())
    assert "7B parameters (the size in the name 'Qwen/Qwen2.5-7B')" in jobs["train"]
    assert "#SBATCH --gpus-per-node=4" in jobs["eval"] and "export DIPNET_DEVICE=cuda" in jobs["eval"]
    # The eval job says what its engine does with those GPUs: a hub name's heads are read when the
    # job starts; a local config's (Qwen2.5-3B's 16 and 2 heads) here; an explicit size as given.
    assert "# vLLM: one engine, tensor_parallel_size=4 (all 4 GPU(s)), or the most of them" in jobs["eval"]
    assert "# vLLM" not in jobs["train"]
    (tmp_path / "qwen3b").mkdir()
    (tmp_path / "qwen3b" / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_attention_heads": 16,
                                                                  "num_key_value_heads": 2}))
    local = load_recipe(REPO / "recipes" / "paper" / "qwen2.5-7b.yaml", [f"model.base={tmp_path / 'qwen3b'}"])
    assert slurm.eval_engine_comment(local, 4) == "tensor_parallel_size=2 of 4 GPU(s): the most that divides " \
                                                 "qwen3b's attention and KV heads"
    for hostile in ('{"text_config": [1], "num_attention_heads": "9"}', "[]", "{not json"):  # one line, never a traceback
        (tmp_path / "qwen3b" / "config.json").write_text(hostile)
        assert slurm.eval_engine_comment(local, 4).startswith("tensor_parallel_size=4"), hostile
    r = load_recipe(REPO / "recipes" / "paper" / "qwen2.5-7b.yaml", ["launch.slurm.eval_gpus=4", "eval.tensor_parallel_size=2"])
    job = slurm.render_job(r, tmp_path / "recipe.yaml", tmp_path / "run", "eval", "eval,report", slurm.slurm_settings(r, _args()))
    assert "# vLLM: one engine, tensor_parallel_size=2 (eval.tensor_parallel_size) on 4 GPU(s);" in job, job
    # Submitting, sinfo's node memory caps it: more than a node has asks for the whole node instead.
    recipe = load_recipe(REPO / "recipes" / "paper" / "qwen2.5-7b.yaml")
    s = slurm.slurm_settings(recipe, _args())
    assert slurm.estimate_mem(recipe, {**s, "node_mem_mb": 200_000}, "train")[0] == "161G"
    mem, why = slurm.estimate_mem(recipe, {**s, "node_mem_mb": 100_000}, "train")
    assert mem == "0" and "161G exceeds the nodes' 100000 MB" in why
    res = run_cli("launch", "recipes/paper/qwen2.5-7b.yaml", "--slurm", "--dry-run", "launch.slurm.mem=0", cwd=REPO)
    assert res.stdout.count("#SBATCH --mem=0") == 4
    res = run_cli("launch", "recipes/paper/qwen2.5-7b.yaml", "--slurm", "--dry-run", "launch.slurm.mem=lots", cwd=REPO)
    assert res.returncode == 2 and "launch.slurm.mem" in res.stderr and "expected a Slurm memory size" in res.stderr
    # USR1 margin: 180 s, but a full fine-tune's train job gets room to write its checkpoint (14 bytes
    # per parameter in bf16, bench/checkpoint_save.py; rank 0's node writes the weights and its
    # nodes' share of the optimizer state at the assumed rate, twice over, plus 60 s).
    rendered = "".join(jobs.values())  # the paper recipe: LoRA, whose checkpoints are small
    assert rendered.count("#SBATCH --signal=B:USR1@180") == 4 and "# USR1 margin" not in rendered
    full = load_recipe(REPO / "recipes" / "paper" / "qwen2.5-7b.yaml", ["train.method=full"])
    for nodes in (1, 2):
        head = 7e9 * 2 + 7e9 * 12 / nodes
        margin, why = slurm.estimate_signal_margin(full, {**s, "nodes": nodes}, "train")
        assert margin == math.ceil(2 * head / slurm.ASSUMED_WRITE_BYTES_PER_S + 60), (nodes, margin)
        assert f"writes ~{head / 1e9:.0f} GB per checkpoint" in why
        assert slurm.estimate_signal_margin(full, {**s, "nodes": nodes}, "eval")[0] == 180
    job = slurm.render_job(full, tmp_path / "recipe.yaml", tmp_path / "run", "train", "train", s)
    assert "#SBATCH --signal=B:USR1@844" in job and "export DIPNET_SIGNAL_MARGIN_S=844" in job
    set_margin = load_recipe(REPO / "recipes" / "paper" / "qwen2.5-7b.yaml",
                             ["train.method=full", "launch.slurm.signal_margin_s=300"])
    job = slurm.render_job(set_margin, tmp_path / "recipe.yaml", tmp_path / "run", "train", "train",
                           slurm.slurm_settings(set_margin, _args()))
    assert "#SBATCH --signal=B:USR1@300" in job and "# USR1 margin: launch.slurm.signal_margin_s" in job
    # Qwen2.5-7B: 28 heads, 4 KV heads: all 4 GPUs; Qwen2.5-3B (16 and 2): 2 of 4; explicit: as given.
    assert gpu_kwargs({"num_attention_heads": 28, "num_key_value_heads": 4}, 4, 0.9) == \
        {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.9}
    assert gpu_kwargs({"num_attention_heads": 16, "num_key_value_heads": 2}, 4, 0.8)["tensor_parallel_size"] == 2
    assert gpu_kwargs({"num_attention_heads": 16, "num_key_value_heads": 2}, 4, 0.8, explicit=True)["tensor_parallel_size"] == 4


def test_cli_dry_run_prints_the_chain():
    res = run_cli("launch", "recipes/tiny-arith.yaml", "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                  cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert [l for l in res.stdout.splitlines() if l.startswith("# ----")] == [
        "# ---- preprocess job (stages base,convert,preprocess) ----", "# ---- train job (stages train) ----",
        "# ---- export job (stages export) ----", "# ---- eval job (stages eval,report) ----"]
    assert "#SBATCH --nodes=2" in res.stdout


def test_cpu_nodes_render_gloo_ranks(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-arith.yaml")
    s = slurm.slurm_settings(recipe, _args(gpus_per_node=0))
    text = slurm.render_job(recipe, tmp_path / "r.yaml", tmp_path, "train", "train", s)
    assert "export DS_ACCELERATOR=cpu" in text and "export DIPNET_PROCS_PER_NODE=2" in text


def test_sbatch_missing_is_a_plain_error(tmp_path):
    env = {"PATH": "/usr/bin/nonexistent"}
    res = run_cli("launch", REPO / "recipes" / "tiny-arith.yaml", "--slurm", f"run.output_dir={tmp_path}/x",
                  env={**env, "PATH": str(Path(os.sys.executable).parent)})
    assert res.returncode == 2 and "sbatch not found" in res.stderr


USR1_SCRIPT = """
import os, signal, sys
from dipnet.pipeline.cli import main
from dipnet.pipeline.env import note_usr1_in_job
if sys.argv[2] == "during start-up":
    note_usr1_in_job()
    os.kill(os.getpid(), signal.SIGUSR1)
rc = main(["run", sys.argv[1], "--only", "base"])
if sys.argv[2] == "after the last stage":
    os.kill(os.getpid(), signal.SIGUSR1)
print("exit", rc)
"""


@pytest.mark.parametrize("when", ["during start-up", "after the last stage"])
def test_usr1_in_a_slurm_job_is_never_fatal(tmp_path, tiny_base_dir, when):
    """Slurm's time-limit USR1 can come at any moment of a job (its limit check runs every 30 s).
    Python's default action would kill dipnet, and Slurm calls such a job FAILED and never requeues
    it: a restart that had finished training was lost that way (#29). During start-up it must
    preempt the first stage (requeue; here no job exists, so the requeue fails and says so); after
    the last stage it is moot and the job exits 0."""
    p = write_recipe(tmp_path, "usr1", {})
    env = {**os.environ, "SLURM_JOB_ID": "999999", "DIPNET_SLURM_LAUNCHER": "torchrun",
           "PATH": str(Path(sys.executable).parent)}  # no scontrol: the requeue reaches no cluster
    res = subprocess.run([sys.executable, "-c", USR1_SCRIPT, str(p), when], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "exit 0" in res.stdout, (res.returncode, res.stdout + res.stderr)
    base = json.loads((tmp_path / "usr1" / "manifest.json").read_text())["stages"]["base"]
    if when == "during start-up":
        assert base["status"] == "interrupted" and "job NOT requeued" in base["error"], base
        assert "[base] preempted" in res.stdout
    else:
        assert base["status"] == "completed", base


# ----------------------------------------------------------------------------- the real cluster

FAST = {
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    "train": {"max_steps": 6, "micro_batch_size": 4, "save_every": 3, "log_every": 1, "zero_stage": 2},
    "launch": {"launcher": "torchrun", "procs_per_node": 2, "slurm": {"cpus_per_task": 2}},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 24},
    "report": {"smoothness": False},
}


def _recipe(tmp_path, name, extra=None):
    return write_recipe(tmp_path, name, FAST, extra)


def _launch(p, *extra):
    res = run_cli("launch", p, "--slurm", "--gpus-per-node", "0", *extra, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.mark.slurm
def test_chain_runs_on_two_ranks(tmp_path, tiny_base_dir):
    need_cluster()
    p = _recipe(tmp_path, "chain")
    res = _launch(p)
    assert res.stdout.count("submitted job") == 4
    st = run_cli("status", tmp_path / "chain", "--wait", "--timeout", "600", cwd=REPO, timeout=700)
    assert st.returncode == 0, st.stdout + st.stderr
    assert [l.split()[-1] for l in st.stdout.splitlines() if " job " in l] == ["COMPLETED"] * 4
    run = tmp_path / "chain"
    summary = json.loads((run / "train" / "main-s0" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    log = (run / "train" / "train.log").read_text()
    assert "torch.distributed.run" in log and "--nproc_per_node 2" in log
    assert (run / "export" / "main-s0" / "model.safetensors").is_file()
    assert (run / "eval" / "main-s0" / "results.json").is_file() and (run / "report.md").is_file()
    # A rerun of a finished chain submits nothing.
    again = _launch(p)
    assert "nothing submitted" in again.stdout and "submitted job" not in again.stdout


@pytest.mark.slurm
def test_failing_stage_cancels_the_rest(tmp_path, tiny_base_dir):
    need_cluster()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops\n')  # exists, so it validates
    p = _recipe(tmp_path, "failing", {"data": {"train": str(bad)}})
    _launch(p)
    st = run_cli("status", tmp_path / "failing", "--wait", "--timeout", "300", cwd=REPO, timeout=400)
    assert st.returncode == 1
    states = [l.split()[3] for l in st.stdout.splitlines() if " job " in l and l.split()[0] in ("preprocess", "train", "export", "eval")]
    assert states[0] == "FAILED" and all(s == "CANCELLED" for s in states[1:]), st.stdout
    assert f"stage preprocess FAILED: {bad}:2: invalid JSON" in st.stdout


@pytest.mark.slurm
def test_cancel_leaves_nothing_running(tmp_path, tiny_base_dir):
    need_cluster()
    p = _recipe(tmp_path, "cancelled", {"train": {"max_steps": 400, "save_every": 400}})
    _launch(p)
    run = tmp_path / "cancelled"
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]
    train_id = jobs[1]["job_id"]
    deadline = time.time() + 300
    while slurm.job_state(train_id)[0] != "RUNNING":
        assert time.time() < deadline and slurm.job_state(train_id)[0] in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(train_id)
        time.sleep(0.5)
    while not (run / "train" / "main-s0" / "metrics.jsonl").is_file():  # ranks are training
        assert time.time() < deadline
        time.sleep(0.5)
    res = run_cli("cancel", run, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert all(slurm.job_state(j["job_id"])[0] == "CANCELLED" for j in jobs[1:])
    # This run's jobs only: the suite's other worker may have jobs of its own on the cluster.
    steps = subprocess.run(["squeue", "-h", "-s", "--jobs", ",".join(j["job_id"] for j in jobs)],
                           capture_output=True, text=True).stdout.strip()
    assert steps == "", steps
    time.sleep(2)
    ps = subprocess.run(["pgrep", "-f", f"{run}/train"], capture_output=True, text=True).stdout.strip()
    assert ps == "", f"processes left: {ps}"


@pytest.mark.slurm
@pytest.mark.parametrize("flags,code,needle", [
    (["--partition", "nosuch"], 1, "sbatch refused"),
    (["--cpus-per-task", "64"], 2, "asks for 1 node(s) x 64 cpus per task, but partition 'debug' has"),
    (["--nodes", "9"], 2, "asks for 9 node(s) x 2 cpus per task, but partition 'debug' has")])
def test_resource_errors_in_plain_words(tmp_path, flags, code, needle):
    need_cluster()
    p = _recipe(tmp_path, "refused")
    res = run_cli("launch", p, "--slurm", "--gpus-per-node", "0", *flags, cwd=REPO)
    if (tmp_path / "refused" / "slurm" / "jobs.json").is_file():
        run_cli("cancel", tmp_path / "refused", cwd=REPO)
    assert res.returncode == code
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and ".sbatch" in line and needle in line.lower(), line
    if code == 1:
        assert "invalid partition" in line.lower()
    assert not (tmp_path / "refused" / "slurm" / "jobs.json").exists()
