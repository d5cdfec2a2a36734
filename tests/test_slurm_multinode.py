"""Many nodes under Slurm, for real: the 2-node cluster of tests/slurm_cluster.sh (two slurmd,
each in its own network namespace). Ranks on both launcher paths, preemption and requeue, time
limits, and the offline compute-node rule. Skips with one line only where the cluster (network
namespaces) is unavailable; in CI it must be there.
"""

import json
import os
import subprocess
import time

import pytest
from conftest import REPO, built_for_the_session, cli_in_process, run_cli, write_recipe

from dipnet.launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CONF = REPO / "tests" / ".slurm" / "etc" / "slurm.conf"


def _usable(sinfo_out: str) -> int:
    """Nodes that can run jobs, from `sinfo -h -o '%D %T'`."""
    return sum(int(line.split()[0]) for line in sinfo_out.splitlines()
               if line.split()[1] in ("idle", "mixed", "allocated"))


def need_nodes(n: int = 2):
    os.environ.setdefault("SLURM_CONF", str(CONF))
    nodes_file = REPO / "tests" / ".slurm" / "nodes"
    have = int(nodes_file.read_text()) if nodes_file.is_file() else 0
    try:  # with no controller, sinfo retries for ~60 s; a live test cluster answers in under 1 s
        res = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=10) \
            if subprocess.run(["which", "sinfo"], capture_output=True).returncode == 0 else None
    except subprocess.TimeoutExpired:
        res = None
    idle = _usable(res.stdout) if res and res.returncode == 0 else 0
    if have >= n and res and res.returncode == 0 and idle < n:
        # A neighbouring test (xdist) may have a node down for a minute: the node-loss test
        # revives it. Wait for it rather than fail.
        deadline = time.time() + 180
        while idle < n and time.time() < deadline:
            time.sleep(2)
            idle = _usable(subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True,
                                          timeout=10).stdout)
    if have < n or idle < n:
        why = f"needs the {n}-node Slurm cluster (tests/slurm_cluster.sh start --nodes {n}); found {idle} node(s)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


# 2 nodes x 1 rank. Inside a node's network namespace the host name resolves to 127.0.0.1 (as
# Debian's 127.0.1.1 line does on many clusters): with nothing set, the ranks find the interface
# that holds their node's Slurm address; the time-limit tests name it themselves (the override).
TWO_NODES = {
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    "train": {"max_steps": 6, "micro_batch_size": 4, "save_every": 3, "log_every": 1, "zero_stage": 2},
    "launch": {"procs_per_node": 1, "slurm": {"nodes": 2, "cpus_per_task": 2}},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 24},
    "report": {"smoothness": False},
}


def _launch(p, *extra):
    res = run_cli("launch", p, "--slurm", "--gpus-per-node", "0", *extra, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _wait(run, timeout=600):
    """Wait for the chain. A requeued job waits out Slurm's own hold (PENDING, reason BeginTime:
    cred_expire + 1 s, 21 s on the test cluster) while the old start is cleaned up on its nodes.
    Cutting the hold short (scontrol update StartTime=now) races that clean-up: on a slower
    machine the new start met its node still revoking the old credential and failed with
    JobLaunchFailure."""
    jobs = [j["job_id"] for j in json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(slurm.settled_state(j)[0] in slurm.TERMINAL for j in jobs):
            break
        time.sleep(0.5)
    st = run_cli("status", run, cwd=REPO)
    assert st.returncode == 0 and "COMPLETED" in st.stdout, st.stdout + st.stderr
    return st


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train" / "main-s0" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe trained on one node with 2 local ranks (no Slurm)."""
    def build(root):
        p = write_recipe(root, "ref", TWO_NODES, {"launch": {"launcher": "deepspeed", "procs_per_node": 2}})
        res = cli_in_process("run", p, "--only", "base,convert,preprocess,train", cwd=REPO)
        assert res.returncode == 0, res.stderr[-2000:]

    return built_for_the_session(tmp_path_factory, "slurm-reference", build) / "ref"


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_like_one_node(tmp_path, tiny_base_dir, reference, launcher):
    need_nodes(2)
    p = write_recipe(tmp_path, "nodes", TWO_NODES, {"launch": {"slurm": {**TWO_NODES["launch"]["slurm"],
                                                                         "launcher": launcher}}})
    _launch(p, "--until", "train")
    run = tmp_path / "nodes"
    _wait(run)
    summary = json.loads((run / "train" / "main-s0" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    log = (run / "train" / "train.log").read_text()
    assert ("torch.distributed.run" if launcher == "torchrun" else "--launcher slurm") in log
    for node in ("node1", "node2"):  # nothing set: each found the interface holding its NodeAddr
        assert f"node {node}: gloo and NCCL over eth0, the interface holding its Slurm address" in log, log[-3000:]
    job_logs = "".join(p.read_text() for p in (run / "slurm").glob("train-*.log"))
    assert "on 2 node(s): node1 node2" in job_logs and "169.254.77.11" in job_logs
    a, b = _losses(reference), _losses(run)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    # The first job staged the base model into the run directory (compute nodes may be offline).
    base = run / "base" / "model"
    assert base.is_dir() and not base.is_symlink() and (base / "model.safetensors").is_file()


def test_requeue_mid_training_resumes_to_the_same_weights(tmp_path, tiny_base_dir, reference):
    """`scontrol requeue` while training: the ranks save on SIGTERM, Slurm requeues the job under
    the same id, the next start resumes, the chain completes, and the final weights equal an
    uninterrupted run's."""
    need_nodes(2)
    from dipnet.pipeline.export import consolidate_zero_checkpoint
    from dipnet.pipeline.checkpoint import latest_checkpoint

    slow = {"launch": {"slurm": {**TWO_NODES["launch"]["slurm"],
                                 "env": {"GLOO_SOCKET_IFNAME": "eth0", "DIPNET_FAULT_SLOW_STEP": "1.5:first-start"}}}}
    p = write_recipe(tmp_path, "requeue", TWO_NODES, slow)
    _launch(p, "--until", "train")
    run = tmp_path / "requeue"
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]
    train_id = jobs[1]["job_id"]
    metrics = run / "train" / "main-s0" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # mid-training
        assert time.time() < deadline, slurm.job_state(train_id)
        time.sleep(0.3)
    t0 = time.time()
    res = subprocess.run(["scontrol", "requeue", train_id], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _wait(run)
    logs = "".join(p.read_text() for p in sorted((run / "slurm").glob("train-*.log")))
    assert "restart 1" in logs  # the same job started again
    train_log = (run / "train" / "train.log").read_text()
    assert "stopped by a signal after step" in train_log and "resumed from" in train_log
    a = consolidate_zero_checkpoint(latest_checkpoint(reference / "train" / "main-s0" / "checkpoints"))
    b = consolidate_zero_checkpoint(latest_checkpoint(run / "train" / "main-s0" / "checkpoints"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    print(f"\nrequeue -> chain complete in {time.time() - t0:.0f} s")


def test_time_limit_signal_saves_and_requeues(tmp_path, tiny_base_dir, reference):
    """A 1-minute limit with USR1 20 s before it (Slurm delivers it 10-40 s into the job: its
    limit check runs every 30 s): the ranks save, the job requeues itself under the same id, and
    the chain completes in later starts with the same final weights. Steps are slowed (8 s) in the
    first start only, so the limit hits it and a restart can finish."""
    need_nodes(2)
    from dipnet.pipeline.export import consolidate_zero_checkpoint
    from dipnet.pipeline.checkpoint import latest_checkpoint

    slow = {"train": {**TWO_NODES["train"], "max_steps": 6},
            "launch": {"slurm": {**TWO_NODES["launch"]["slurm"], "time": "1", "signal_margin_s": 20,
                                 "env": {"GLOO_SOCKET_IFNAME": "eth0", "DIPNET_FAULT_SLOW_STEP": "8:first-start"}}}}
    p = write_recipe(tmp_path, "limit", TWO_NODES, slow)
    _launch(p, "--until", "train")
    run = tmp_path / "limit"
    _wait(run, timeout=900)
    logs = "".join(p.read_text() for p in sorted((run / "slurm").glob("train-*.log")))
    assert "restart 1" in logs and "preempted: job requeued" in logs, logs[-3000:]
    assert "stopped by a signal after step" in (run / "train" / "train.log").read_text()  # saved on USR1
    a = consolidate_zero_checkpoint(latest_checkpoint(reference / "train" / "main-s0" / "checkpoints"))
    b = consolidate_zero_checkpoint(latest_checkpoint(run / "train" / "main-s0" / "checkpoints"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_a_node_dies_mid_training_and_the_job_resumes_to_the_same_weights(tmp_path, tiny_base_dir, reference):
    """node2 dies as a powered-off machine does (its link goes down, then slurmd, the job step and
    the rank are SIGKILLed; the rank on node1 never sees a reset and waits in its collective).
    Slurm marks node2 DOWN after SlurmdTimeout, ends the job and requeues it under the same id;
    once node2 is back, the job resumes from the last complete checkpoint and the final weights
    equal an uninterrupted run's. The timeline is printed."""
    need_nodes(2)
    from dipnet.pipeline.checkpoint import latest_checkpoint
    from dipnet.pipeline.export import consolidate_zero_checkpoint

    # --exclusive: no other job (another xdist worker's) shares node2 when it dies.
    slow = {"launch": {"slurm": {**TWO_NODES["launch"]["slurm"], "extra_sbatch": ["--exclusive"],
                                 "env": {"DIPNET_FAULT_SLOW_STEP": "2:first-start"}}}}
    p = write_recipe(tmp_path, "nodeloss", TWO_NODES, slow)
    _launch(p, "--until", "train")
    run = tmp_path / "nodeloss"
    train_id = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"][-1]["job_id"]
    metrics = run / "train" / "main-s0" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):  # past the step-3 checkpoint
        assert time.time() < deadline, slurm.job_state(train_id)
        time.sleep(0.2)
    cluster = ["bash", str(REPO / "tests" / "slurm_cluster.sh")]
    t = {"kill": time.time()}
    try:
        subprocess.run([*cluster, "kill-node", "2"], check=True, capture_output=True)
        while "down" not in _node_state("node2"):
            assert time.time() - t["kill"] < 120, ("node2 never marked down", _node_state("node2"))
            time.sleep(0.5)
        t["node down"] = time.time()
        while True:  # Slurm requeues the job under the same id (and holds it for cred_expire)
            show = subprocess.run(["scontrol", "show", "job", train_id], capture_output=True, text=True).stdout
            if "JobState=PENDING" in show and "Restarts=1" in show:
                break
            assert time.time() - t["kill"] < 180, show
            time.sleep(0.5)
        t["job requeued"] = time.time()
    finally:  # whatever happened, the cluster gets its node back for the other tests
        subprocess.run([*cluster, "revive-node", "2"], check=True, capture_output=True)
    while "idle" not in _node_state("node2") and "alloc" not in _node_state("node2") \
            and "mix" not in _node_state("node2"):
        assert time.time() - t["kill"] < 240, _node_state("node2")
        time.sleep(0.5)
    t["node back"] = time.time()
    _wait(run)
    t["chain complete"] = time.time()
    train_log = (run / "train" / "train.log").read_text()
    assert "resumed from" in train_log and "at step 3" in train_log, train_log[-3000:]
    logs = "".join(f.read_text() for f in sorted((run / "slurm").glob("train-*.log")))
    assert "restart 1" in logs, logs[-3000:]
    a = consolidate_zero_checkpoint(latest_checkpoint(reference / "train" / "main-s0" / "checkpoints"))
    b = consolidate_zero_checkpoint(latest_checkpoint(run / "train" / "main-s0" / "checkpoints"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    print("\nnode loss: " + ", ".join(f"{k} +{v - t['kill']:.0f} s" for k, v in t.items() if k != "kill"))
