"""Faults and bad input: nothing lost, every error in one clear line.

Faults are injected for real: a rank SIGKILLs itself mid-step, the whole run is kill -9'd
inside a checkpoint write, `dipnet run` gets SIGINT while ranks train, a save hits a full disk,
the master port is taken, and a vLLM engine cannot start.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_in_process, write_recipe

pytestmark = pytest.mark.slow

FAST = {
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    "train": {"max_steps": 12, "micro_batch_size": 4, "save_every": 4, "log_every": 1, "zero_stage": 2},
    "launch": {"launcher": "deepspeed", "procs_per_node": 2},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 24},
    "report": {"smoothness": False},
}


def recipe(tmp_path, name, extra=None):
    return write_recipe(tmp_path, name, FAST, extra)


def manifest(run_dir):
    return json.loads((Path(run_dir) / "manifest.json").read_text())["stages"]


def train_procs(run_dir) -> list[int]:
    """PIDs of live (non-zombie) training ranks of this run."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "dipnet.pipeline.train" in cmd and str(run_dir) in cmd and state != "Z":
            pids.append(int(d))
    return pids


def one_error_line(res):
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    err = [l for l in lines if l.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return err[0]


def test_kill9_one_rank_then_rerun_resumes(tmp_path, tiny_base_dir):
    p = recipe(tmp_path, "kill")
    run = tmp_path / "kill"
    res = cli_in_process("run", p, env={"DIPNET_FAULT_KILL": "1:7"})  # rank 1 dies by SIGKILL inside step 7
    assert res.returncode == 1
    line = one_error_line(res)
    assert "training failed" in line
    m = manifest(run)
    assert m["train"]["status"] == "failed" and "training failed" in m["train"]["error"]
    assert train_procs(run) == []  # no rank left running
    assert (run / "train" / "main-s0" / "checkpoints" / "latest").read_text() == "step-000004"
    res = cli_in_process("run", p, "--only", "train")  # the resume is under test; later stages are tested elsewhere
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run / "train" / "train.log").read_text()
    assert "resumed from" in log and "step-000004 at step 4" in log
    assert manifest(run)["train"]["status"] == "completed"


# The checkpoint-write tests check the write, not the launcher (kill -9 of a rank and SIGINT keep
# the deepspeed launcher's process tree under test): torchrun starts ~4 s faster.
TORCHRUN = {"launch": {"launcher": "torchrun", "procs_per_node": 2}}


def test_a_hung_rank_ends_the_run_after_the_collective_timeout(tmp_path, tiny_base_dir):
    """Rank 1 stops inside step 3 and never returns (a hung driver call, a dead node's rank: no
    reset ever reaches its peer). Rank 0 waits in the gradient all-reduce for
    launch.collective_timeout_s, then the run fails in one line: it does not wait forever."""
    p = recipe(tmp_path, "hang", {"launch": {**TORCHRUN["launch"], "collective_timeout_s": 10}})
    t0 = time.time()
    res = cli_in_process("run", p, "--only", "base,convert,preprocess,train", env={"DIPNET_FAULT_HANG": "1:3"})
    took = time.time() - t0
    assert res.returncode == 1, res.stderr[-2000:]
    line = one_error_line(res)
    assert "training failed" in line and "10000ms" in line, line
    assert took < 120, took  # the 10 s timeout, start-up and the launcher's clean-up; never 30 min
    assert train_procs(tmp_path / "hang") == []


def test_kill9_during_checkpoint_write_never_uses_it(tmp_path, tiny_base_dir):
    p = recipe(tmp_path, "ckpt", TORCHRUN)
    run = tmp_path / "ckpt"
    ck = run / "train" / "main-s0" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "dipnet.pipeline.cli", "run", str(p)], cwd=tmp_path,
                            env={**os.environ, "DIPNET_FAULT_SLOW_SAVE": "8:60"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (ck / ".tmp-step-000008" / "trainer_state.json").is_file():  # mid-write: shards and state there
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    for pid in train_procs(run):  # kill -9 everything: the run and its ranks
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ck / "latest").read_text() == "step-000004" and (ck / ".tmp-step-000008").is_dir()
    res = cli_in_process("run", p, "--only", "train")
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run / "train" / "train.log").read_text()
    assert "step-000004 at step 4" in log  # resumed from the previous complete one
    assert not (ck / ".tmp-step-000008").exists() and (ck / "latest").read_text() == "step-000012"


def test_sigint_stops_every_child_and_rerun_resumes(tmp_path, tiny_base_dir):
    p = recipe(tmp_path, "sigint", {"train": {"max_steps": 400, "save_every": 5}})
    run = tmp_path / "sigint"
    # Ctrl-C as a person's shell delivers it: with SIGINT's default disposition. A test suite started
    # in the background of a non-interactive shell (`make test &`) inherits SIGINT *ignored*, and
    # Python then never installs its KeyboardInterrupt handler, so restore the default first.
    proc = subprocess.Popen([sys.executable, "-m", "dipnet.pipeline.cli", "run", str(p)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = run / "train" / "main-s0" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.is_file():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    ranks = train_procs(run)
    assert len(ranks) >= 2  # the two ranks (and the deepspeed runner and launcher, whose command lines name the train module)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert time.time() - t0 < 30
    assert proc.returncode == 130 and "error: interrupted" in proc.stderr.read()
    time.sleep(0.5)
    assert train_procs(run) == [] and not any(os.path.exists(f"/proc/{r}") and
                                              open(f"/proc/{r}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                              for r in ranks)
    assert manifest(run)["train"]["status"] == "interrupted"
    step = int(latest.read_text().split("-")[1])
    # The ranks stopped on SIGTERM at the end of a step and saved it (not only the every-5 ones).
    assert f"stopped by a signal after step {step}; checkpoint saved" in (run / "train" / "train.log").read_text()
    res = cli_in_process("run", p, "train.max_steps=400", env={"DIPNET_FAULT_KILL": f"0:{step + 2}"})
    # (killed again two steps after resuming: enough to see that it resumed, without 400 steps)
    assert res.returncode == 1 and manifest(run)["train"]["status"] == "failed"
    assert f"step-{step:06d} at step {step}" in (run / "train" / "train.log").read_text()


def test_disk_full_while_saving_names_path_and_keeps_previous(tmp_path, tiny_base_dir, tmpfs):
    """The run directory on a real 28 MiB file system: the stages before training take ~4 MB and a
    checkpoint 16 MB, so step 4's fits and step 8's fills the disk half-way. One line names the
    checkpoint and the way out; the partial write is removed; step 4's checkpoint is whole (its
    checksums verify), and with room again (the file system grown) the rerun resumes from it."""
    from dipnet.pipeline.checkpoint import checkpoint_problem

    disk = tmpfs("28m")
    run = disk / "full"
    p = recipe(tmp_path, "full", {**TORCHRUN, "run": {"name": "full", "output_dir": str(run)}})
    res = cli_in_process("run", p)
    assert res.returncode == 1
    line = one_error_line(res)
    ck = run / "train" / "main-s0" / "checkpoints"
    assert f"cannot write checkpoint {ck}/.tmp-step-000008: no space left on device" in line, line
    assert "run.output_dir" in line and "latest complete checkpoint is still" in line and "step-000004" in line
    assert (ck / "latest").read_text() == "step-000004" and not (ck / ".tmp-step-000008").exists()
    assert checkpoint_problem(ck / "step-000004") is None
    assert manifest(run)["train"]["status"] == "failed"
    subprocess.run(["mount", "-o", "remount,size=80m", str(disk)], check=True)
    res = cli_in_process("run", p, "--only", "train")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step-000004 at step 4" in (run / "train" / "train.log").read_text()
    assert (ck / "latest").read_text() == "step-000012"


def test_master_port_in_use(tmp_path, tiny_base_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = recipe(tmp_path, "port", {"launch": {"master_port": port}})
        res = cli_in_process("run", p)
        line = one_error_line(res)
        assert res.returncode == 2
        assert f"launch.master_port {port} is already in use" in line and "launch.master_port=PORT" in line
    # Without the key a free port is chosen (every other test relies on it).


def test_vllm_engine_failure_keeps_other_results(tmp_path, tiny_base_dir):
    # Two training steps in one process: the model only has to exist for vLLM to refuse it.
    p = recipe(tmp_path, "engine", {"eval": {"engine": "vllm"}, "train": {**FAST["train"], "max_steps": 2, "save_every": 2},
                                    "launch": {"launcher": "single"}})
    run = tmp_path / "engine"
    res = cli_in_process("run", p, "--only", "base,convert,preprocess,train,export")
    assert res.returncode == 0, res.stderr[-2000:]
    cfg_path = run / "export" / "main-s0" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers picks the class by model_type; vLLM by `architectures`: only vLLM fails.
    cfg["architectures"] = ["DipnetUnknownForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    res = cli_in_process("run", p, "--only", "eval")
    assert res.returncode == 1
    line = one_error_line(res)
    assert "eval failed for 1 model(s): main-s0: vLLM engine failed to start for" in line
    assert (run / "eval" / "base" / "results.json").is_file()  # the model evaluated before is kept
    assert not (run / "eval" / "main-s0").exists() and not list((run / "eval").glob("*.tmp-*"))
    assert manifest(run)["eval"]["status"] == "failed"


# ----------------------------------------------------------------------------- bad input

def _models(tmp_path) -> dict:
    """Small broken model directories."""
    import torch
    import transformers as T

    out = {}
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    out["noconfig"] = d
    d = tmp_path / "pickle"
    d.mkdir()
    T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=1).save_pretrained(d)
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    out["pickle"] = d
    from dipnet.pipeline.models import copy_tokenizer_files

    def with_tokenizer(config, name):
        d = tmp_path / name
        T.AutoModelForCausalLM.from_config(config).save_pretrained(d)
        copy_tokenizer_files(_tiny(), d)  # the tiny base's 512-token tokenizer
        return d

    out["bloom"] = with_tokenizer(T.BloomConfig(vocab_size=600, hidden_size=32, n_layer=1, n_head=2), "bloom")
    out["smallvocab"] = with_tokenizer(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=1), "smallvocab")
    d = tmp_path / "remote"
    m = T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=1))
    m.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    out["remote"] = d
    return out


def _tiny():
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.recipe import TinyBaseSettings

    return tiny_base(TinyBaseSettings(), progress=False)


def _data(tmp_path) -> dict:
    d = {}
    d["empty"] = tmp_path / "empty.jsonl"
    d["empty"].write_text("")
    d["badjson"] = tmp_path / "bad.jsonl"
    d["badjson"].write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "#### 1"}\n{oops\n')
    d["nofield"] = tmp_path / "nofield.jsonl"
    d["nofield"].write_text('{"question": "q", "answer": "#### 1"}\n{"question": "only a question"}\n')
    d["long"] = tmp_path / "long.jsonl"
    d["long"].write_text(json.dumps({"question": "Ann has 3 pens. " * 40, "answer": "#### 3"}) + "\n")
    return d


# (args builder, exit code, substring of the one error line)
BAD_INPUT = [
    # recipes
    ("recipe", {"trian": {}}, 2, "unknown key 'trian' (did you mean 'train'?)"),
    ("recipe", {"train": {"lr": "high"}}, 2, "'train.lr': expected a number, got 'high'"),
    ("recipe", {"train": {"micro_batch_size": -1}}, 2, "'train.micro_batch_size': expected a value > 0, got -1"),
    ("recipe", {"train": {"max_steps": 0}}, 2, "'train.max_steps': expected a value > 0, got 0"),
    ("recipe", {"data": {"max_length": 0}}, 2, "'data.max_length': expected a value > 0, got 0"),
    ("recipe", {"dip": {"gamma": 0.1, "trajectories": 1}}, 2, "dip.gamma > 0 needs dip.trajectories >= 2"),
    ("recipe", {"train": {"zero_stage": 4}}, 2, "'train.zero_stage': expected a value <= 3, got 4"),
    ("recipe", {"model": {"base": "/nonexistent/base"}}, 2, "'model.base': no such model directory: /nonexistent/base"),
    ("recipe", {"run": {"name": "../escape"}}, 2, "'run.name': expected a plain name"),
    ("recipe", {"dip": {"init_variance": -0.1}}, 2, "'dip.init_variance': expected a value > 0.0, got -0.1"),
    ("recipe", {"train": {"offload": True, "zero_stage": 1}}, 2, "train.offload needs train.zero_stage 2 or 3"),
    ("recipe", {"train": {"method": "lora", "lora": {"target_modules": ["qkv_proj"]}}, "launch": {"launcher": "single"}},
     1, "train.lora.target_modules: 'qkv_proj' matches no module of the model"),
    ("recipe", {"model": {"attn_implementation": "flash_attention_2"}}, 2,
     "model.attn_implementation flash_attention_2 needs a CUDA GPU"),
    ("recipe", {"model": {"attn_implementation": "flash"}}, 2, "'model.attn_implementation': expected one of"),
    ("recipe_text", "run:\n  name: [unclosed\n", 2, "invalid YAML"),
    # data
    ("recipe", {"data": {"train": "/nonexistent/train.jsonl"}}, 2, "'data.train': no such file: /nonexistent/train.jsonl"),
    ("data", "empty", 2, "empty.jsonl: empty data file"),
    ("data", "badjson", 2, "bad.jsonl:3: invalid JSON"),
    ("data", "nofield", 2, "nofield.jsonl:2: row has no 'answer' (format gsm8k needs question, answer)"),
    ("data_refuse", "long", 2, "long.jsonl:1: example has"),
    # models
    ("convert", "noconfig", 2, "not a Hugging Face model directory (no config.json)"),
    ("convert", "pickle", 2, "only pickle checkpoints (pytorch_model.bin); dipnet loads safetensors only"),
    ("convert", "bloom", 2, "unsupported architecture 'bloom' for DIP; supported families:"),
    ("convert", "smallvocab", 2, "tokenizer has 512 tokens but the model's embedding has 64 rows"),
    ("convert", "remote", 2, "this model needs its own code (auto_map in config.json); set model.trust_remote_code"),
    ("convert", "/nonexistent/model", 2, "/nonexistent/model: no such model directory"),
    # CLI
    ("cli", ["rnu", "x.yaml"], 2, "unknown command 'rnu' (did you mean 'run'?)"),
    ("cli", ["eval", "MODEL", "--tasks", "gsm9k", "--out", "OUT"], 2, "unknown task 'gsm9k' (did you mean 'gsm8k'?)"),
    ("cli", ["report", "/nonexistent/run"], 2, "/nonexistent/run: not a run directory (no manifest.json)"),
    ("cli", ["status", "/nonexistent/run"], 2, "/nonexistent/run: no such run directory"),
    ("cli", ["export", "/nonexistent/ckpt", "--out", "OUT"], 2, "/nonexistent/ckpt: no complete checkpoint"),
    ("cli", ["run", "RECIPE", "train.lr"], 2, "override 'train.lr': expected KEY=VALUE"),
    ("cli", ["run", "RECIPE", "--from", "trian"], 2, "--from trian: unknown stage"),
    ("cli", ["eval", "--predictions", "PRED", "--task", "gsm8k", "--out", "OUT"], 2, "row has no 'target'"),
    ("cli", ["serve", "/nonexistent/model"], 2, "/nonexistent/model: no such model directory"),
    ("cli", ["validate", "/nonexistent/recipe.yaml"], 2, "/nonexistent/recipe.yaml: no such recipe file"),
]


@pytest.mark.parametrize("kind,arg,code,needle", BAD_INPUT, ids=[f"{b[0]}-{b[3][:30]}" for b in BAD_INPUT])
def test_bad_input_one_line_exit_code_nothing_half_written(tmp_path, tiny_base_dir, kind, arg, code, needle):
    run_dir = tmp_path / "run"
    base_raw = {"run": {"name": "bad", "output_dir": str(run_dir)}, **json.loads(json.dumps(FAST))}
    base_raw["train"]["max_steps"] = 2
    rp = tmp_path / "recipe.yaml"
    if kind == "recipe":
        raw = json.loads(json.dumps(base_raw))
        for k, v in arg.items():
            raw.setdefault(k, {}).update(v)
        rp.write_text(yaml.safe_dump(raw))
        args = ["run", rp]
    elif kind == "recipe_text":
        rp.write_text(arg)
        args = ["run", rp]
    elif kind in ("data", "data_refuse"):
        raw = json.loads(json.dumps(base_raw))
        raw["data"]["train"] = str(_data(tmp_path)[arg])
        if kind == "data_refuse":
            raw["data"]["overlength"] = "refuse"
        rp.write_text(yaml.safe_dump(raw))
        args = ["run", rp]
    elif kind == "convert":
        src = _models(tmp_path).get(arg, arg)
        args = ["convert", src, "--out", run_dir / "converted"]
    else:
        rp.write_text(yaml.safe_dump(base_raw))
        pred = tmp_path / "pred.jsonl"
        pred.write_text(json.dumps({"output": "#### 3"}) + "\n")
        subs = {"RECIPE": str(rp), "OUT": str(tmp_path / "out"), "MODEL": str(tiny_base_dir), "PRED": str(pred)}
        args = [subs.get(a, a) for a in arg]
    res = cli_in_process(*args, cwd=tmp_path)
    assert res.returncode == code, (res.returncode, res.stderr[-1500:])
    line = one_error_line(res)
    assert needle in line, line
    # Nothing half-written: no temporary leftovers, no output of the failed stage or command.
    if run_dir.exists():
        assert not list(run_dir.rglob("*.tmp-*")), list(run_dir.rglob("*.tmp-*"))
        assert not (run_dir / "converted").exists()
        if (run_dir / "manifest.json").is_file():
            stages = manifest(run_dir)
            failed = [s for s, e in stages.items() if e["status"] == "failed"]
            assert len(failed) == 1 and stages[failed[0]]["error"]
            assert not (run_dir / failed[0]).exists() or failed[0] in ("train", "base")
    assert not (tmp_path / "out").exists() or kind == "cli"


def test_security_defaults():
    """safetensors only, weights_only loads, no remote code by default, serve binds loopback."""
    import ast

    from dipnet.eval.serve import serve_command
    from dipnet.pipeline.recipe import Recipe

    assert Recipe().model.trust_remote_code is False
    assert "--host" in serve_command("m", "127.0.0.1", 8000) and serve_command("m", "127.0.0.1", 8000)[
        serve_command("m", "127.0.0.1", 8000).index("--host") + 1] == "127.0.0.1"
    from dipnet.pipeline.cli import build_parser

    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"
    for path in list((REPO / "pipeline").glob("*.py")) + list((REPO / "eval").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(getattr(node.func, "value", None), "id", "") == "torch":
                kws = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kws and getattr(kws["weights_only"], "value", None) is True, f"{path}:{node.lineno}"
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{path}:{node.lineno}"
            if isinstance(node, ast.keyword) and node.arg == "use_safetensors":
                assert node.value.value is True
