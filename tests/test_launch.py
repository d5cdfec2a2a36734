"""Launcher commands: deepspeed (local and hostfile), torchrun, single; ports; DeepSpeed configs."""

import json

import pytest
from conftest import REPO

from dipnet.launch import local as launch
from dipnet.launch.ds_config import build_ds_config
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import LaunchSettings, TrainSettings


def test_deepspeed_local_and_hostfile(tmp_path):
    cmd = launch.train_command(LaunchSettings(), 2, 29555, ["--runs", "r.json"])
    assert cmd[0].endswith("deepspeed") and cmd[1:5] == ["--num_gpus", "2", "--master_port", "29555"]
    assert cmd[5:7] == ["--module", "dipnet.pipeline.train"] and cmd[-2:] == ["--runs", "r.json"]
    hf = tmp_path / "hostfile"
    hf.write_text((REPO / "launch" / "hostfile.example").read_text())
    cmd = launch.train_command(LaunchSettings(hostfile=str(hf), master_addr="node001"), 8, 29500, [])
    i = cmd.index("--hostfile")
    assert cmd[i + 1] == str(hf) and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert cmd[cmd.index("--master_addr") + 1] == "node001" and cmd[cmd.index("--num_gpus") + 1] == "8"
    assert launch.parse_hostfile(hf) == [("node001", 8), ("node002", 8)]
    hf.write_text("node001 slots=8\nnode002 gpus=8\n")
    with pytest.raises(UsageError, match=r"hostfile:2: expected 'HOST slots=N' \(a plain host name, N >= 1\), got 'node002 gpus=8'"):
        launch.parse_hostfile(hf)


def test_torchrun_and_single():
    cmd = launch.train_command(LaunchSettings(launcher="torchrun"), 2, 29501, ["--x"])
    assert cmd[1:9] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29501",
                        "-m", "dipnet.pipeline.train"]
    cmd = launch.train_command(LaunchSettings(launcher="single"), 1, 29502, ["--x"])
    assert cmd[1:3] == ["-m", "dipnet.pipeline.train"] and cmd[-1] == "--x"


def test_rank_env_sets_threads_and_cpu_accelerator():
    env = launch.rank_env(2, 1234)
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == str(max(1, (__import__("os").cpu_count() or 2) // 2))


def test_ports():
    p = launch.free_port()
    assert launch.port_is_free(p) and launch.choose_master_port(None) > 0


@pytest.mark.parametrize("stage,offload", [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)])
def test_ds_configs_filled(stage, offload):
    t = TrainSettings(zero_stage=stage, offload=offload, micro_batch_size=4, grad_accum=3, grad_clip=0.5, precision="bf16")
    cfg = build_ds_config(t, world_size=2)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["stage"] == stage
    assert "auto" not in json.dumps(cfg)
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in cfg["zero_optimization"]) == offload


def test_offload_needs_stage_2():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="train.offload needs train.zero_stage 2 or 3"):
        TrainSettings(zero_stage=1, offload=True)


def test_run_ranks_polls_while_the_ranks_run(tmp_path):
    """The train stage prints each run's line as it finishes, while the launch goes on: run_ranks
    calls on_poll during the wait (here: a 'rank' that writes its summary, then keeps running)."""
    import sys

    flag = tmp_path / "train_summary.json"
    seen = []
    cmd = [sys.executable, "-c", f"import time; open({str(flag)!r}, 'w').write('{{}}'); time.sleep(1.5)"]
    launch.run_ranks(cmd, {}, tmp_path / "log", 60, on_poll=lambda: seen.append(flag.is_file()), poll_s=0.1)
    assert True in seen  # a poll saw the finished run's file while the launcher still ran
    launch.run_ranks([sys.executable, "-c", "pass"], {}, tmp_path / "log3", None, poll_s=0.1)  # no limit: waits to the end
    with pytest.raises(Exception, match="timed out"):
        launch.run_ranks([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path / "log2", 0.5,
                         on_poll=lambda: None, poll_s=0.1, grace_s=1)


def test_a_failed_launch_names_the_ranks_first_error_and_the_node_interface(tmp_path):
    """The stage error carries the cause a rank raised first, not torchrun's ChildFailedError
    summary nor a later rank's echo; a multi-node rank finds the interface holding an address."""
    from dipnet.launch.local import last_error_line
    from dipnet.launch.slurm import interface_holding, node_socket_env

    log = tmp_path / "train.log"
    log.write_text("[rank1]: Traceback (most recent call last):\n"
                   "[rank1]: RuntimeError: [gloo/transport/tcp/pair.cc:144] connect [127.0.0.1]:4242: Connection refused\n"
                   "[rank0]: torch.distributed.DistBackendError: peer gone\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert last_error_line(log).endswith("connect [127.0.0.1]:4242: Connection refused")
    log.write_text("RuntimeError: first\ndipnet error: step 3: out of memory\nValueError: later\n")
    assert last_error_line(log) == "step 3: out of memory"
    assert interface_holding("127.0.0.1") == "lo" and interface_holding("203.0.113.99") is None
    assert node_socket_env({"SLURM_NNODES": "1"}) == {}  # one node: loopback is fine
    assert node_socket_env({"SLURM_NNODES": "2", "GLOO_SOCKET_IFNAME": "ib0"}) == {}  # the user's choice stands
