"""Hostile and careless input: no code runs that the user did not ask for, nothing is deleted that
dipnet did not write, every error is one line.

Every file dipnet reads (recipe, data, model directory, checkpoint, run directory) is treated as
written by an attacker. Each case asserts the exit code and the one `error:` line, and where it
applies that a marker payload never ran and that a sentinel file survived. Most cases run the
real CLI in-process (`cli.main`), which is what `dipnet` runs, without paying a Python start-up
per case.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dipnet.pipeline.cli import main as cli_main

PAYLOAD = "import pathlib, os\npathlib.Path(os.environ.get('DIPNET_PWNED', '/tmp/dipnet-pwned')).write_text('ran')\n"


# ----------------------------------------------------------------------------- helpers

def cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, args, code: int, needle: str) -> str:
    rc, out, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def pwned(tmp_path, monkeypatch):
    """Where a payload would write if it ever ran; asserted absent after each attack."""
    p = tmp_path / "PWNED"
    monkeypatch.setenv("DIPNET_PWNED", str(p))
    yield p
    assert not p.exists(), "a payload from an untrusted file ran"


@pytest.fixture
def sentinel(tmp_path):
    """A directory dipnet did not write, with a file that must survive every attack."""
    d = tmp_path / "precious"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    yield d
    assert (d / "keep.txt").read_text() == "mine", "dipnet deleted or changed a file it did not write"


def _evil_model(base: Path, dest: Path, how: str) -> Path:
    """A copy of a good model directory that would run PAYLOAD if its code were loaded."""
    shutil.copytree(base, dest)
    (dest / ".dipnet.json").unlink(missing_ok=True)
    (dest / "modeling_evil.py").write_text(PAYLOAD + "from transformers import LlamaForCausalLM as EvilLM\n")
    cfg = json.loads((dest / "config.json").read_text())
    if how == "config":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM", "AutoConfig": "modeling_evil.EvilLM"}
    elif how == "tokenizer":
        tc = json.loads((dest / "tokenizer_config.json").read_text())
        tc["auto_map"] = {"AutoTokenizer": ["modeling_evil.EvilLM", None]}
        (dest / "tokenizer_config.json").write_text(json.dumps(tc))
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 2-step single-rank DeepSpeed run of the tiny base (ZeRO-1, DIP): a checkpoint to attack."""
    from trainhelp import train

    root = tmp_path_factory.mktemp("hostile_train")
    out = root / "train"
    train(out, {"train.max_steps": 2, "train.save_every": 2, "train.zero_stage": 1, "dip.method": "dip",
                "launch.launcher": "single"}, procs=1)
    return out


def _ckpt_copy(trained: Path, tmp_path: Path) -> Path:
    d = tmp_path / "train"
    shutil.copytree(trained, d)
    return d / "checkpoints" / "step-000002"


def _edit_state(ckpt: Path, fn) -> None:
    p = ckpt / "trainer_state.json"
    state = json.loads(p.read_text())
    fn(state)
    p.write_text(json.dumps(state))
    _reseal(ckpt)


def _reseal(ckpt: Path) -> None:
    """What an attacker who edits a checkpoint also does: rewrite checksums.json to match, so the
    defences behind the checksums are the ones tested."""
    from dipnet.pipeline.checkpoint import write_checksums

    write_checksums(ckpt, is_main=True)


# ----------------------------------------------------------------------------- 1. code execution

@pytest.mark.parametrize("how", ["config", "tokenizer", "py-only"])
def test_export_never_trusts_the_checkpoint(capsys, tmp_path, trained, tiny_base_dir, pwned, how):
    evil = _evil_model(tiny_base_dir, tmp_path / "evil", how)
    ckpt = _ckpt_copy(trained, tmp_path)

    def poison(state):
        state["model_dir"] = str(evil)
        state["recipe"]["model"]["trust_remote_code"] = True

    _edit_state(ckpt, poison)
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out"], 2, "this model needs its own code")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_export_base_flag_overrides_the_checkpoints_model_dir(capsys, tmp_path, trained, tiny_base_dir, pwned):
    evil = _evil_model(tiny_base_dir, tmp_path / "evil", "config")
    ckpt = _ckpt_copy(trained, tmp_path)
    _edit_state(ckpt, lambda s: s.update(model_dir=str(evil)))
    rc, out, err = cli(capsys, "export", ckpt, "--out", tmp_path / "out", "--base", tiny_base_dir)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "export.json").read_text())["model_dir"] == str(tiny_base_dir)
    assert not list((tmp_path / "out").glob("*.py"))


@pytest.mark.parametrize("cmd", [
    ["convert", "{evil}", "--out", "{tmp}/c"],
    ["eval", "{evil}", "--tasks", "arith-id", "--engine", "hf", "--out", "{tmp}/e"],
    ["serve", "{evil}", "--port", "1"],
    ["smoothness", "{evil}"],
])
def test_commands_refuse_model_code_without_the_flag(capsys, tmp_path, tiny_base_dir, pwned, cmd):
    evil = _evil_model(tiny_base_dir, tmp_path / "evil", "config")
    args = [a.format(evil=evil, tmp=tmp_path) for a in cmd]
    refused(capsys, args, 2, "this model needs its own code (auto_map in config.json)")


def test_run_refuses_model_code_without_the_recipe_asking(capsys, tmp_path, tiny_base_dir, pwned):
    evil = _evil_model(tiny_base_dir, tmp_path / "evil", "tokenizer")
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "x", "output_dir": str(tmp_path / "run")}, "model": {"base": str(evil)}}))
    refused(capsys, ["run", rp, "--only", "base"], 2, "auto_map in tokenizer_config.json")


@pytest.mark.parametrize("target", ["optim", "model"])
def test_pickle_payload_in_a_checkpoint_never_unpickles(capsys, tmp_path, trained, pwned, target):
    ckpt = _ckpt_copy(trained, tmp_path)
    files = sorted((ckpt / ckpt.name).glob("*optim_states.pt" if target == "optim" else "*model_states.pt"))
    assert files
    evil_pickle = subprocess.run(
        [sys.executable, "-c", "import pickle, sys, os\n"
         "class P:\n    def __reduce__(self):\n"
         f"        return (exec, ({PAYLOAD!r},))\n"
         "sys.stdout.buffer.write(pickle.dumps({'module': P(), 'optimizer_state_dict': P()}))"],
        capture_output=True, check=True).stdout
    files[0].write_bytes(evil_pickle)
    # Swapped in without resealing, the checksums refuse the file before anything unpickles it.
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out"], 1, "is damaged")
    _edit_state(ckpt, lambda s: s.update(zero_stage=0) if target == "model" else None)
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out"], 2, "cannot read the DeepSpeed checkpoint")


def test_dip_config_cannot_name_an_unknown_method(capsys, tmp_path, tiny_base_dir):
    rc, _, err = cli(capsys, "convert", tiny_base_dir, "--out", tmp_path / "c")
    assert rc == 0, err
    p = tmp_path / "c" / "dip" / "dip_config.json"
    cfg = json.loads(p.read_text())
    cfg["method"] = "__import__('os').system('touch x')"
    p.write_text(json.dumps(cfg))
    refused(capsys, ["eval", tmp_path / "c", "--tasks", "arith-id", "--engine", "hf", "--out", tmp_path / "e"], 2,
            "'method' has an invalid value")


# ----------------------------------------------------------------------------- 2. shell injection into Slurm scripts

SLURM_FIELDS = [
    ({"run": {"name": "x\nrm -rf ~"}}, "'run.name': expected a plain name"),
    ({"run": {"name": "a;b"}}, "'run.name': expected a plain name"),
    ({"launch": {"slurm": {"partition": "gpu\ntouch /tmp/x"}}}, "'launch.slurm.partition': expected letters"),
    ({"launch": {"slurm": {"partition": "$(touch /tmp/x)"}}}, "'launch.slurm.partition': expected letters"),
    ({"launch": {"slurm": {"account": "proj\n#SBATCH --wrap=x"}}}, "'launch.slurm.account': expected letters"),
    ({"launch": {"slurm": {"time": "04:00:00\necho pwned"}}}, "'launch.slurm.time': expected a Slurm time"),
    ({"launch": {"slurm": {"time": "abc"}}}, "'launch.slurm.time': expected a Slurm time"),
    ({"launch": {"slurm": {"extra_sbatch": ["--qos=high\ntouch /tmp/x"]}}}, "expected one option like '--qos=high'"),
    ({"launch": {"slurm": {"extra_sbatch": ["--comment=$(id)"]}}}, "expected one option like '--qos=high'"),
    ({"launch": {"slurm": {"extra_sbatch": ["--qos=a b"]}}}, "expected one option like '--qos=high'"),
    ({"launch": {"slurm": {"env": {"A;touch x": "1"}}}}, "expected a variable name"),
    ({"launch": {"slurm": {"env": {"HF_HOME": "/a\ntouch /tmp/x"}}}}, "has a newline or control character"),
    ({"launch": {"master_addr": "host;touch x"}}, "'launch.master_addr': expected a host name"),
    ({"run": {"output_dir": "runs/x\ntouch /tmp/y"}}, "'run.output_dir': expected a directory path without control"),
]


@pytest.mark.parametrize("section,needle", SLURM_FIELDS, ids=[n[:40] for _, n in SLURM_FIELDS])
def test_hostile_slurm_fields_are_refused_at_the_recipe(capsys, tmp_path, section, needle):
    raw = {"run": {"name": "ok", "output_dir": str(tmp_path / "run")}}
    for k, v in section.items():
        raw.setdefault(k, {}).update(v)
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(raw))
    refused(capsys, ["launch", rp, "--slurm", "--dry-run"], 2, needle)


@pytest.mark.parametrize("flags,needle", [
    (["--partition", "a\nb"], "--partition (launch.slurm.partition): expected letters"),
    (["--time", "abc"], "--time (launch.slurm.time): expected a Slurm time"),
    (["--account", "$(id)"], "--account (launch.slurm.account)"),
    (["--nodes", "0"], "--nodes (launch.slurm.nodes): expected a value > 0"),
    (["--gpus-per-node", "-1"], "--gpus-per-node (launch.slurm.gpus_per_node)"),
])
def test_hostile_launch_flags(capsys, tmp_path, flags, needle):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(tmp_path / "run")}}))
    refused(capsys, ["launch", rp, "--slurm", "--dry-run", *flags], 2, needle)


def test_run_directory_with_spaces_cannot_reach_a_job_script(capsys, tmp_path):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(tmp_path / "a b")}}))
    refused(capsys, ["launch", rp, "--slurm", "--dry-run"], 2, "contains spaces, quotes or shell characters")


def test_rendered_script_quotes_values_it_must_accept(tmp_path, monkeypatch):
    """Env values may hold `$()`, quotes and spaces: the rendered script, run by bash, treats them as text."""
    from argparse import Namespace

    from dipnet.launch import slurm
    from dipnet.pipeline.recipe import load_recipe

    marker = tmp_path / "pwned-by-env"
    raw = {"run": {"name": "ok", "output_dir": str(tmp_path / "run")},
           "launch": {"slurm": {"env": {"X": f"$(touch {marker})", "Y": f"`touch {marker}`; touch {marker}",
                                        "Z": "it's \"quoted\" & spaced"}}}}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(rp)
    args = Namespace(nodes=None, gpus_per_node=None, cpus_per_task=None, partition=None, time=None, account=None,
                     launcher=None)
    monkeypatch.setattr(sys, "executable", "/bin/true")  # the job's final exec does nothing
    text = slurm.render_job(recipe, rp, tmp_path / "run", "train", "train", slurm.slurm_settings(recipe, args))
    script = tmp_path / "job.sh"
    script.write_text(text + '\necho "X=$X"\necho "Z=$Z"\n'.replace("exec /bin/true", "/bin/true"))
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (stub / "scontrol").chmod(0o755)
    script.write_text(text.replace("exec /bin/true", "/bin/true") + '\necho "X=$X"\necho "Z=$Z"\n')
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env={"PATH": f"{stub}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7"})
    assert res.returncode == 0, res.stderr
    assert f"X=$(touch {marker})" in res.stdout and "Z=it's \"quoted\" & spaced" in res.stdout
    assert not marker.exists()


def test_hostile_jobs_file_cannot_pass_options_to_scancel(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs.json").write_text(json.dumps(
        {"jobs": [{"stage": "train", "stages": "train", "job_id": "--user=root", "log": "x"}]}))
    refused(capsys, ["cancel", run], 2, "malformed job entry")
    (run / "slurm" / "jobs.json").write_text("[1, 2]")
    refused(capsys, ["status", run], 2, "expected a JSON object")


@pytest.mark.parametrize("line", ["node1;touch x slots=2", "node1 slots=0", "$(id) slots=1"])
def test_hostile_hostfile(capsys, tmp_path, line):
    hf = tmp_path / "hosts"
    hf.write_text(line + "\n")
    from dipnet.pipeline.errors import UsageError
    from dipnet.launch.local import parse_hostfile

    with pytest.raises(UsageError, match="expected 'HOST slots=N'"):
        parse_hostfile(hf)


# ----------------------------------------------------------------------------- 3. names and paths

BAD_NAMES = ["../../../x", "/abs/path", ".hidden", "a/b", "..", "x\ny", "", "a b", "x" * 200]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_variant_names_cannot_become_paths(capsys, tmp_path, sentinel, name):
    (sentinel / "inputs.json").write_text('{"key": "x"}')  # what the train stage would rmtree
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(tmp_path / "run")},
                                  "variants": {name: {"dip.method": "none"}, "sft": {}}}))
    refused(capsys, ["validate", rp], 2, "expected a plain name")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../escape", "/etc", ".", "a/b"])
def test_run_names_cannot_become_paths(capsys, tmp_path, name):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": name}}))
    refused(capsys, ["validate", rp], 2, "'run.name': expected a plain name")


def _run_dir_with_manifest(tmp_path, stages: dict) -> Path:
    from dipnet.pipeline.outputs import write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))
    return run


def test_manifest_cannot_point_training_outside_the_run(capsys, tmp_path, tiny_base_dir, sentinel):
    done = {"status": "completed", "inputs_hash": "x", "outputs_hash": "y"}
    run = _run_dir_with_manifest(tmp_path, {
        "convert": {**done, "outputs": {"model_dir": str(sentinel)}},
        "preprocess": {**done, "outputs": {"path": str(sentinel), "key": "k"}}})
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(run)}}))
    refused(capsys, ["run", rp, "--only", "train"], 2, "convert model_dir")


def test_manifest_cannot_name_exports_outside_the_run(capsys, tmp_path, sentinel):
    done = {"status": "completed", "inputs_hash": "x", "outputs_hash": "y"}
    run = _run_dir_with_manifest(tmp_path, {
        "train": {**done, "outputs": {"../../escape": {"checkpoint": str(sentinel), "key": "k"}}}})
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(run)}}))
    refused(capsys, ["run", rp, "--only", "export"], 2, "is not a valid name")


def test_report_refuses_hostile_manifest_entries(capsys, tmp_path, sentinel):
    done = {"status": "completed", "inputs_hash": "x", "outputs_hash": "y"}
    run = _run_dir_with_manifest(tmp_path, {
        "eval": {**done, "outputs": {"base": {"results": str(sentinel / "results.json"), "variant": "base"}}}})
    refused(capsys, ["report", run, "--no-smoothness"], 2, "is outside")
    (run / "manifest.json").write_text(json.dumps({"stages": {"eval": {**done, "outputs": {
        "../x": {"results": str(run / "eval" / "x" / "results.json"), "variant": "x"}}}}}))
    refused(capsys, ["report", run, "--no-smoothness"], 2, "is not a valid name")
    # The λ diagnostics read training batches only from the run's own preprocess output.
    (run / "manifest.json").write_text(json.dumps({"stages": {"preprocess": {**done, "outputs": {
        "path": str(sentinel / "examples.safetensors"), "key": "k"}}}}))
    refused(capsys, ["report", run, "--no-smoothness"], 2, "preprocess path")
    (run / "manifest.json").write_text("{not json")
    refused(capsys, ["report", run, "--no-smoothness"], 2, "invalid JSON")


def test_base_link_that_is_a_real_directory_is_not_replaced(capsys, tmp_path, tiny_base_dir, sentinel):
    from dipnet.pipeline.outputs import write_marker

    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    write_marker(run, "run")
    shutil.move(str(sentinel), str(run / "base" / "model"))
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(run)}}))
    refused(capsys, ["run", rp, "--only", "base"], 2, "is not the link dipnet makes")
    shutil.move(str(run / "base" / "model"), str(sentinel))


# ----------------------------------------------------------------------------- 4. data loss

def test_export_into_its_own_input_is_refused(capsys, tmp_path, trained):
    ckpt = _ckpt_copy(trained, tmp_path)
    train_dir = ckpt.parent.parent
    before = sorted(p.name for p in (train_dir / "checkpoints").iterdir())
    refused(capsys, ["export", train_dir, "--out", train_dir], 2, "is the input")
    refused(capsys, ["export", train_dir, "--out", ckpt / "x"], 2, "is the input")
    refused(capsys, ["export", ckpt, "--out", tmp_path], 2, "contains the input")
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == before


def test_outputs_dipnet_did_not_write_are_refused(capsys, tmp_path, trained, tiny_base_dir, sentinel):
    ckpt = _ckpt_copy(trained, tmp_path)
    refused(capsys, ["export", ckpt, "--out", sentinel], 2, "was not written by dipnet")
    refused(capsys, ["convert", tiny_base_dir, "--out", sentinel], 2, "was not written by dipnet")
    refused(capsys, ["base", "tiny", "--out", sentinel], 2, "was not written by dipnet")
    refused(capsys, ["eval", tiny_base_dir, "--tasks", "arith-id", "--engine", "hf", "--limit", "2",
                     "--out", sentinel], 2, "was not written by dipnet")
    (tmp_path / "afile").write_text("x")
    refused(capsys, ["convert", tiny_base_dir, "--out", tmp_path / "afile"], 2, "is not a directory")
    (tmp_path / "link").symlink_to(sentinel)
    refused(capsys, ["convert", tiny_base_dir, "--out", tmp_path / "link"], 2, "is a symbolic link")


def test_convert_into_its_input_is_refused(capsys, tmp_path, tiny_base_dir):
    src = tmp_path / "model"
    shutil.copytree(tiny_base_dir, src)
    refused(capsys, ["convert", src, "--out", src], 2, "is the input")
    refused(capsys, ["convert", src, "--out", src / "sub"], 2, "is the input")
    assert (src / "model.safetensors").is_file()


def test_run_output_dir_that_is_not_a_run_is_refused(capsys, tmp_path, sentinel):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"run": {"name": "ok", "output_dir": str(sentinel)}}))
    refused(capsys, ["run", rp], 2, "exists and was not written by dipnet")


def test_failed_reexport_keeps_the_previous_export(tmp_path, trained, monkeypatch):
    from dipnet.pipeline import export
    from dipnet.pipeline.errors import RunError

    ckpt = _ckpt_copy(trained, tmp_path)
    out = tmp_path / "out"
    export.export_checkpoint(ckpt, out)
    good = (out / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise RunError("logits differ (injected)")

    monkeypatch.setattr(export, "_verify", broken)
    with pytest.raises(RunError, match="injected"):
        export.export_checkpoint(ckpt, out)
    assert (out / "model.safetensors").read_bytes() == good and (out / "export.json").is_file()
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))


def test_interrupted_eval_leaves_the_previous_results_consistent(capsys, tmp_path, tiny_base_dir, monkeypatch):
    from dipnet.eval import evaluate

    out = tmp_path / "e"
    rc, _, err = cli(capsys, "eval", tiny_base_dir, "--tasks", "arith-id", "--engine", "hf", "--limit", "2",
                     "--max-new-tokens", "4", "--out", out)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = evaluate.score_rows

    def die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "score_rows", die)
    rc, _, err = cli(capsys, "eval", tiny_base_dir, "--tasks", "arith-id", "--engine", "hf", "--limit", "3",
                     "--max-new-tokens", "4", "--out", out)
    assert rc == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob("e.tmp-*"))


def test_stale_temporaries_only_of_dead_processes_and_only_ours(tmp_path):
    from dipnet.pipeline.outputs import MARKER, output_dir, write_marker

    out = tmp_path / "m"
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours_dead = tmp_path / f"m.tmp-{dead.pid}"
    ours_dead.mkdir()
    write_marker(ours_dead, "model")
    foreign = tmp_path / f"m.tmp-{dead.pid + 1000000}"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    live = tmp_path / f"m.tmp-{os.getppid()}"
    live.mkdir()
    (live / MARKER).write_text((ours_dead / MARKER).read_text())
    with output_dir(out, "model") as tmp:
        (tmp / "x").write_text("1")
    assert not ours_dead.exists() and foreign.exists() and live.exists() and (out / "x").is_file()


def test_predictions_rescore_cannot_overwrite_its_input(capsys, tmp_path):
    d = tmp_path / "preds"
    d.mkdir()
    p = d / "samples.jsonl"
    p.write_text(json.dumps({"output": "#### 3", "target": "#### 3"}) + "\n")
    refused(capsys, ["eval", "--predictions", p, "--task", "gsm8k", "--out", d], 2, "contains the input")
    assert p.is_file()


# ----------------------------------------------------------------------------- 5. recipes bounded

def _recipe_text(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")) + "variants:\n  v:\n    dip.layers: *i\n"

RECIPE_TEXTS = [
    (BOMB, "expands to more than 100000 values"),
    ("run:\n  name: a\nrun:\n  name: b\n", "line 3: duplicate key 'run' (first at line 1)"),
    ("train:\n  lr: 1.0\n  lr: 2.0\n", "duplicate key 'lr'"),
    ("train:\n  lr: .inf\n", "'train.lr': expected"),
    ("dip:\n  init_variance: .nan\n", "'dip.init_variance'"),
    ("seeds: [0, 0]\n", "seeds must be distinct"),
    ("dip:\n  layers: [0, 0]\n", "dip.layers lists a block twice"),
    ("variants:\n  v: {variants: {w: {}}}\n  sft: {}\n", "a variant cannot set variants"),
    ("variants:\n  v: {seeds: [1, 2]}\n  sft: {}\n", "a variant cannot set seeds"),
    ("variants:\n  v: {run.output_dir: /tmp/x}\n  sft: {}\n", "a variant cannot set run.output_dir"),
    ("variants:\n  v: {run: {name: other}}\n  sft: {}\n", "a variant cannot set run.name"),
    ("variants:\n  v: {dip: {alpha: inf}}\n  sft: {}\n", "(variant 'v'): 'dip.alpha'"),
    ("- run\n- model\n", "expected a mapping of sections"),
    ("[" * 5000, "nested too deeply"),
    ("eval:\n  noise_sigmas: [-1.0]\n", "σ values must be >= 0"),
    ("launch:\n  slurm:\n    env: {A: 1, A: 2}\n", "duplicate key 'A'"),
    ('model:\n  base: "touch pwned\\nx-7B"\n', "'model.base': the name has a newline or control character"),
    ("False\n", "expected a mapping of sections (run, model, dip, ...), got bool"),
    ("run:\n  seed: 99999999999999999999999\n", "'run.seed': expected a value <= 4294967295"),
    ("seeds: [1, 18446744073709551617]\n", "seeds must be between 0 and 4294967295"),
]


@pytest.mark.parametrize("text,needle", RECIPE_TEXTS, ids=[n[:40] for _, n in RECIPE_TEXTS])
def test_recipe_bounds(capsys, tmp_path, text, needle):
    refused(capsys, ["validate", _recipe_text(tmp_path, text)], 2, needle)


def test_recipe_size_and_encoding(capsys, tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("# " + "x" * (1 << 20) + "\n")
    refused(capsys, ["validate", p], 2, "a recipe is at most 1048576 bytes")
    p.write_bytes(b"run:\n  name: \xff\xfe\n")
    refused(capsys, ["validate", p], 2, "not UTF-8 text (byte 13)")


def test_variant_sections_merge_key_by_key(tmp_path):
    from dipnet.pipeline.recipe import expand_runs, load_recipe

    p = _recipe_text(tmp_path, "dip:\n  init_variance: 0.02\n  alpha: 0.5\nvariants:\n  v: {dip: {alpha: 0.1}}\n"
                               "  sft: {dip: {method: none}}\nseeds: [3, 4]\n")
    runs = {(v, s): r for v, s, r in expand_runs(load_recipe(p))}
    assert runs[("v", 3)].dip.init_variance == 0.02 and runs[("v", 3)].dip.alpha == 0.1
    assert runs[("sft", 4)].dip.method == "none" and runs[("sft", 4)].dip.init_variance == 0.02
    assert runs[("sft", 4)].run.seed == 4


def test_lora_with_zero1_exports(tmp_path):
    """Formerly refused at export (ZeRO-1 checkpoints lack the frozen base): frozen weights now come from the base."""
    from trainhelp import train

    from dipnet.pipeline.export import export_checkpoint

    out = tmp_path / "lora1"
    train(out, {"train.max_steps": 1, "train.save_every": 1, "train.zero_stage": 1, "train.method": "lora",
                "train.lora.r": 2, "launch.launcher": "single"}, procs=1)
    s = export_checkpoint(out, tmp_path / "exp")
    assert s["lora_merged"] == 4 * 4 and s["max_logit_diff"] <= s["tolerance"]


# ----------------------------------------------------------------------------- 6. silently accepted, now refused

def _broken_copy(tiny_base_dir, tmp_path, mutate) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_base_dir, d)
    mutate(d)
    return d


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _shard_outside(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))


def _fewer_layers(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))


MODEL_BREAKS = [
    (_truncate, "truncated"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "truncated safetensors file (0 bytes)"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!"),
     "not a safetensors file (its header is not JSON)"),
    (lambda d: (d / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}"), "header of"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}"), "holds no tensors"),
    (_shard_outside, "weight_map names '../../etc/passwd'"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object of model settings, got list"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), "no 'model_type'"),
    (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'), "not UTF-8 text"),
    (_fewer_layers, "the weights do not provide every tensor of the model"),
]


@pytest.mark.parametrize("mutate,needle", MODEL_BREAKS, ids=[n[:40] for _, n in MODEL_BREAKS])
def test_broken_model_directories(capsys, tmp_path, tiny_base_dir, mutate, needle):
    d = _broken_copy(tiny_base_dir, tmp_path, mutate)
    refused(capsys, ["eval", d, "--tasks", "arith-id", "--engine", "hf", "--limit", "1", "--out", tmp_path / "e"], 2,
            needle)
    assert not (tmp_path / "e").exists()


def test_nan_lambda_is_refused(capsys, tmp_path, tiny_base_dir):
    import torch
    from safetensors.torch import load_file, save_file

    rc, _, err = cli(capsys, "convert", tiny_base_dir, "--out", tmp_path / "c")
    assert rc == 0, err
    p = tmp_path / "c" / "dip" / "dip.safetensors"
    state = load_file(str(p))
    k = next(iter(state))
    state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, str(p))
    refused(capsys, ["eval", tmp_path / "c", "--tasks", "arith-id", "--engine", "hf", "--out", tmp_path / "e"], 2,
            f"'{k}' holds non-finite log-variances")


EVAL_FLAGS = [
    (["--limit", "-1"], "--limit: expected a value > 0, got -1"),
    (["--limit", "0"], "--limit: expected a value > 0, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected a value > 0, got 0"),
    (["--shots", "-2"], "--shots: expected a value >= 0"),
    (["--shots", "100000"], "100000 shots asked, the train split has"),
    (["--noise-sigmas", "abc"], "--noise-sigmas: expected comma-separated numbers, got 'abc'"),
    (["--noise-sigmas", "-1"], "σ values must be >= 0"),
    (["--dip-mode", "average:0"], "--dip-mode: expected 'mean' or 'average:K'"),
    (["--dip-mode", "median"], "--dip-mode: expected 'mean' or 'average:K'"),
    (["--engine", "trt"], "--engine: expected one of"),
    (["--tasks", ","], "--tasks: expected at least one task"),
    (["--max-new-tokens", "5000"], "exceeds the model's context of 256 tokens"),
]


@pytest.mark.parametrize("flags,needle", EVAL_FLAGS, ids=[n[:40] for _, n in EVAL_FLAGS])
def test_eval_numbers_checked_before_work(capsys, tmp_path, tiny_base_dir, flags, needle):
    args = ["eval", tiny_base_dir, "--engine", "hf", "--tasks", "arith-id", "--out", tmp_path / "e", *flags]
    if "--engine" in flags:
        args = ["eval", tiny_base_dir, "--tasks", "arith-id", "--out", tmp_path / "e", *flags]
    refused(capsys, args, 2, needle)
    assert not (tmp_path / "e").exists()


CONVERT_FLAGS = [
    (["--layers", "0,0"], "dip.layers lists a block twice"),
    (["--layers", "0,x"], "--layers: expected comma-separated integers"),
    (["--layers", "9"], "dip.layers: block index 9 out of range (the model has 4 blocks)"),
    (["--init-variance", "inf"], "--init-variance"),
    (["--init-variance", "0"], "--init-variance: expected a value > 0"),
    (["--method", "magic"], "--method: expected one of"),
    (["--noise-scale", "nan"], "--noise-scale"),
]


@pytest.mark.parametrize("flags,needle", CONVERT_FLAGS, ids=[n[:40] for _, n in CONVERT_FLAGS])
def test_convert_flags(capsys, tmp_path, tiny_base_dir, flags, needle):
    refused(capsys, ["convert", tiny_base_dir, "--out", tmp_path / "c", *flags], 2, needle)
    assert not (tmp_path / "c").exists()


STATE_BREAKS = [
    (lambda p: p.write_text("{oops"), "invalid JSON"),
    (lambda p: p.write_text("[]"), "expected a JSON object"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "8"})), "'step' must be int"),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "trainable"})),
     "no 'trainable' (written by an older dipnet: retrain)"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "zero_stage": 7})), "out of range"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "recipe": {"train": {"lr": -1}}})),
     "(recipe): 'train.lr'"),
    (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8 text"),
]


@pytest.mark.parametrize("mutate,needle", STATE_BREAKS, ids=[n[:30] for _, n in STATE_BREAKS])
def test_bad_trainer_state(capsys, tmp_path, trained, mutate, needle):
    ckpt = _ckpt_copy(trained, tmp_path)
    mutate(ckpt / "trainer_state.json")
    _reseal(ckpt)  # else the checksums refuse it first (test_export_refuses_a_damaged_checkpoint)
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out"], 2, needle)


DATA_BREAKS = [
    (b'{"question": "q", "answer": "#### 1"}\n\xff\n', "data.jsonl:2: not UTF-8 text"),
    (b'{"question": {"evil": 1}, "answer": "#### 1"}\n', "data.jsonl:1: 'question' must be text, got dict"),
    (b'[' * 100000 + b'\n', "data.jsonl:1:"),
    (b'{"messages": "hi"}\n', "'messages' must be a list"),
]


@pytest.mark.parametrize("content,needle", DATA_BREAKS, ids=[n[:30] for _, n in DATA_BREAKS])
def test_bad_data_rows(tmp_path, tiny_base_dir, content, needle):
    from dipnet.pipeline.data import load_rows, tokenize_rows
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.models import load_tokenizer

    p = tmp_path / "data.jsonl"
    p.write_bytes(content)
    fmt = "chat" if b"messages" in content else "gsm8k"
    with pytest.raises(UsageError, match=None) as exc:
        rows, _ = load_rows(str(p))
        tokenize_rows(rows, fmt, load_tokenizer(tiny_base_dir), 64, "truncate", str(p))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_task_for_predictions(capsys, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"output": "1", "target": "1"}) + "\n")
    refused(capsys, ["eval", "--predictions", p, "--task", "gsm9k", "--out", tmp_path / "o"], 2,
            "unknown task 'gsm9k' (did you mean 'gsm8k'?)")
    assert not (tmp_path / "o").exists()


def test_serve_refuses_a_busy_port_before_starting_vllm(capsys, tiny_base_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        refused(capsys, ["serve", tiny_base_dir, "--port", port], 2, f"port {port} on 127.0.0.1 is already in use")
    refused(capsys, ["serve", tiny_base_dir, "--port", "70000"], 2, "--port: expected 1-65535")


def test_failed_command_prints_no_library_chatter(tmp_path, tiny_base_dir):
    """A real subprocess: nothing but the one error line reaches stderr (no progress bars or warnings)."""
    d = _broken_copy(tiny_base_dir, tmp_path, _fewer_layers)
    res = subprocess.run([sys.executable, "-m", "dipnet.pipeline.cli", "convert", str(d), "--out",
                          str(tmp_path / "c"), "--layers", "9"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr


@pytest.mark.parametrize("name", ["../x", "a/b", "gsm8k\nmalicious: 1", ".hidden", "x" * 101, ""])
def test_harness_task_names_cannot_become_paths(capsys, tmp_path, name):
    """eval.harness_tasks names reach lm-eval's output file names: refused at the flag, one line."""
    rc, _, err = cli(capsys, "eval", tmp_path, "--harness-tasks", f"{name},gsm8k", "--out", tmp_path / "e")
    lines = [x for x in err.splitlines() if x.strip()]
    if name == "":  # an empty name is just skipped by the comma split; the model dir is then refused
        assert rc == 2 and len(lines) == 1
    else:
        assert rc == 2 and len(lines) == 1 and "harness" in lines[0], err
    assert not (tmp_path / "e").exists()


def test_gsm8k_path_cannot_inject_into_harness_task_files(tmp_path):
    """A data directory whose name carries YAML (newlines, tags) is written as a quoted string:
    lm-eval's task file names exactly that directory and nothing else."""
    import shutil

    import yaml
    from conftest import SHARED_GSM8K

    from dipnet.eval.harness import write_local_tasks

    if not (SHARED_GSM8K / "test.jsonl").is_file():
        pytest.skip("../shared/data/gsm8k not present")
    evil = tmp_path / "d\ninclude: passwd\n!!python.object.apply:os.system ['touch x']"
    evil.mkdir()
    for f in ("train.jsonl", "test.jsonl"):
        shutil.copy(SHARED_GSM8K / f, evil / f)
    d = write_local_tasks(tmp_path / "tasks", gsm8k_path=str(evil))
    cfg = yaml.safe_load((d / "gsm8k.yaml").read_text())  # safe_load: any tag would raise here
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((evil / "test.jsonl").resolve())
    assert cfg["include"].endswith("gsm8k.yaml") and "passwd" not in cfg["include"]
    assert not (tmp_path / "x").exists() and not (d / "x").exists()


def test_garbled_train_summary_gives_a_plain_run_line(tmp_path, capsys):
    """A run directory's train_summary.json is not trusted: the console line per run degrades to
    '?' instead of a traceback when its values are not numbers."""
    import json

    from dipnet.pipeline.run import Run

    r = Run.__new__(Run)
    r._announced, r.progress = set(), True
    for i, body in enumerate([{"steps": "x", "wall_s": "y", "last": None}, [1, 2], {"last": {"loss": "nan"}}]):
        (tmp_path / "train_summary.json").write_text(json.dumps(body))
        r._say_trained(f"r{i}", tmp_path)
    assert capsys.readouterr().out.splitlines() == [f"  r{i}: trained ? steps" for i in range(3)]


def test_checkpoint_pointers_cannot_leave_the_checkpoints_directory(tmp_path, trained, sentinel):
    """`latest` and `best` name a checkpoint of this run; one naming a directory elsewhere (even a
    complete-looking one) is ignored and the run's own newest checkpoint is used."""
    from dipnet.pipeline.checkpoint import best_checkpoint, latest_checkpoint, resolve_checkpoint

    ckpt = _ckpt_copy(trained, tmp_path)
    root = ckpt.parent
    (sentinel / "trainer_state.json").write_text("{}")
    for name in ("latest", "best"):
        (root / name).write_text("../../precious")
    assert latest_checkpoint(root) == ckpt and best_checkpoint(root) is None
    assert resolve_checkpoint(root.parent) == ckpt
    (sentinel / "trainer_state.json").unlink()


def test_edited_validation_bookkeeping_is_not_believed():
    """A resumed run reads its best validation NLL from trainer_state.json: only known keys holding
    finite numbers survive (a string there would crash the comparison, a NaN would never improve)."""
    from dipnet.pipeline.train import validation_tracking

    good = {"best_step": 10, "best_val_nll": 3.3, "since_best": 1}
    assert validation_tracking({"validation": good}) == good
    for bad in ({"best_val_nll": "low"}, {"best_val_nll": float("nan")}, {"since_best": True}, {"__class__": 1},
                {"best_step": [1]}):
        assert validation_tracking({"validation": bad}) == {}
    assert validation_tracking({"validation": "x"}) == {} and validation_tracking({}) == {}


# ----------------------------------------------------------------------------- 7. careless inputs, one line each

@pytest.fixture
def small_fs(tmpfs):
    """A 1 MiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    return tmpfs("1m")


def test_disk_full_and_read_only_outputs_are_one_line(capsys, small_fs, tiny_base_dir):
    """convert into a file system that fills up (the tiny base is 4 MB, the disk 1 MiB), then into a
    read-only one: one error line naming the path and what to change, exit 1, nothing left behind."""
    line = refused(capsys, ["convert", tiny_base_dir, "--out", small_fs / "dip"], 1, "the disk is full")
    assert str(small_fs) in line and "run.output_dir, --out" in line
    assert list(small_fs.iterdir()) == []  # the temporary directory went with the failure
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    line = refused(capsys, ["convert", tiny_base_dir, "--out", small_fs / "dip"], 1, "a read-only file system")
    assert str(small_fs) in line


def _edited_weights(tiny_base_dir, tmp_path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "edited"
    shutil.copytree(tiny_base_dir, d)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     "weight 'model.layers.1.mlp.up_proj.weight' (shape [384, 128]) is missing from the weight files"),
    (lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"][:-1].clone()}),
     "weight 'model.norm.weight' has shape [127], config.json implies [128]"),
], ids=["missing", "shape"])
def test_convert_checks_the_weights_against_the_config(capsys, tmp_path, tiny_base_dir, edit, needle):
    d = _edited_weights(tiny_base_dir, tmp_path, edit)
    refused(capsys, ["convert", d, "--out", tmp_path / "out"], 2, needle)
    assert not (tmp_path / "out").exists()


def test_gsm8k_rows_without_an_answer(capsys, tmp_path, tiny_base_dir):
    g = tmp_path / "gsm8k"
    g.mkdir()
    (g / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    (g / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "r"}) + "\n")
    refused(capsys, ["eval", tiny_base_dir, "--tasks", "gsm8k", "--gsm8k-path", g, "--engine", "hf", "--out",
                     tmp_path / "o"], 2, "test.jsonl:2: row has no 'answer'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output,needle", [(None, "row has no 'output'"), (7, "'output' must be text, got int"),
                                           ([1], "'output' must be text, got list")])
def test_prediction_rows_must_hold_text(capsys, tmp_path, output, needle):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"output": "#### 1", "target": 1}) + "\n" + json.dumps({"output": output, "target": "1"}) + "\n")
    line = refused(capsys, ["eval", "--predictions", p, "--task", "gsm8k", "--out", tmp_path / "o"], 2, needle)
    assert "p.jsonl:2:" in line and not (tmp_path / "o").exists()


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory laid out as save_checkpoint lays it out, with random shard bytes."""
    from dipnet.pipeline.checkpoint import write_checksums

    ck = root / f"step-{step:06d}"
    (ck / ck.name).mkdir(parents=True)
    (ck / ck.name / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (ck / "trainer_state.json").write_text("{}")
    write_checksums(ck, is_main=True)
    return ck


def test_rotten_checkpoints_are_found_and_set_aside_never_loaded(tmp_path, capsys):
    """Truncated and missing shards, a rotten or hostile checksums.json: each is a damaged
    checkpoint (never an exception, never a read outside it); with none intact, training starts
    over and says so, and what was set aside is kept."""
    from dipnet.pipeline.checkpoint import checkpoint_problem, latest_intact_checkpoint

    root = tmp_path / "checkpoints"
    a, b = _fake_checkpoint(root, 4), _fake_checkpoint(root, 8)
    assert checkpoint_problem(a) is None and checkpoint_problem(b) is None
    shard = b / b.name / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_problem(b) == f"{b.name}/mp_rank_00_model_states.pt has 100 bytes, 4096 were saved (truncated?)"
    (a / a.name / "mp_rank_00_model_states.pt").unlink()
    assert "is missing" in checkpoint_problem(a)
    assert latest_intact_checkpoint(root, is_main=True) is None
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"no intact checkpoint left in {root}: training starts over from step 0"
    assert sorted(p.name for p in root.iterdir()) == [".damaged-step-000004", ".damaged-step-000008"]

    c = _fake_checkpoint(root, 12)
    (c / "checksums.json").write_text(json.dumps({"files": {"../../../../etc/passwd": {"bytes": 1, "sha256": "0"}}}))
    assert "outside the checkpoint" in checkpoint_problem(c)
    (c / "checksums.json").write_bytes(b"\x00\xff{")
    assert "checksums.json: not UTF-8" in checkpoint_problem(c)
    (c / "checksums.json").unlink()  # written by an older dipnet: not verified, still usable
    assert checkpoint_problem(c) is None and latest_intact_checkpoint(root, is_main=True) == c


def test_model_card_names_cannot_break_its_metadata_or_table():
    """A base name with YAML and Markdown syntax stays one value in the card's metadata and one
    cell in its table."""
    from dipnet.pipeline.export import model_card
    from dipnet.pipeline.recipe import Recipe

    name = "org/evil: {x: 1} | `rm -rf` ---"
    r = Recipe.model_validate({"model": {"base": name}})
    card = model_card({"dtype": "float32", "lora_merged": 0, "lambda_mean": {"layers.0": 3e-3}},
                      {"recipe_obj": r, "step": 8, "tokens_seen": 100, "zero_stage": 2}, "out")
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front)["base_model"] == name
    row = next(line for line in body.splitlines() if line.startswith("| base model |"))
    assert row.count(" | ") == 1 and "\\|" in row and "`" not in row


def _adapter_dir(tmp_path: Path, base, **config) -> Path:
    """An adapter directory as `export.merge_lora: false` writes one, with config overrides."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
           "base_model_name_or_path": str(base), **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
              str(d / "adapter_model.safetensors"))
    return d


ADAPTER_BREAKS = [
    ({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}, "'base_model_name_or_path' must name a local model directory"),
    ({"base_model_name_or_path": ["x"]}, "'base_model_name_or_path' must name a local model directory"),
    ({"peft_type": "PROMPT_TUNING"}, "'peft_type' must be LORA, got 'PROMPT_TUNING'"),
    ({"r": True}, "'r' must be an integer in 1..512"),
    ({"r": 10**9}, "'r' must be an integer in 1..512"),
]


@pytest.mark.parametrize("config,needle", ADAPTER_BREAKS, ids=[n[:40] for _, n in ADAPTER_BREAKS])
def test_hostile_adapter_config_names_no_hub_model(capsys, tmp_path, tiny_base_dir, config, needle):
    """An adapter's config names its base: never a hub id to fetch, never a model with code."""
    d = _adapter_dir(tmp_path, tiny_base_dir, **config)
    refused(capsys, ["eval", d, "--tasks", "arith-id", "--engine", "hf", "--limit", "2", "--out", tmp_path / "ev"], 2,
            needle)


def test_adapter_base_with_code_and_pickle_adapter_are_refused(capsys, tmp_path, tiny_base_dir, pwned):
    evil = _evil_model(tiny_base_dir, tmp_path / "evil", "config")
    d = _adapter_dir(tmp_path, evil)
    refused(capsys, ["eval", d, "--tasks", "arith-id", "--engine", "hf", "--limit", "2", "--out", tmp_path / "ev"], 2,
            "this model needs its own code")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_base_dir)}))
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    refused(capsys, ["eval", d, "--tasks", "arith-id", "--engine", "hf", "--limit", "2", "--out", tmp_path / "ev"], 2,
            "no adapter_model.safetensors (dipnet loads safetensors only)")


def test_adapter_export_of_a_full_run_is_refused(capsys, tmp_path, trained):
    ckpt = _ckpt_copy(trained, tmp_path)
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out", "--no-merge-lora"], 2,
            "export.merge_lora: false (--no-merge-lora) needs a LoRA run; this one is train.method full")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_checks_the_repo_first_and_keeps_the_export_when_the_hub_is_away(capsys, tmp_path, trained,
                                                                                       monkeypatch):
    """There is no network here: the Hub endpoint is a closed port on 127.0.0.1. A bad repo id is
    refused before anything is written; a failed upload names the repo and leaves the export
    complete, and the token never reaches the output."""
    ckpt = _ckpt_copy(trained, tmp_path)
    refused(capsys, ["export", ckpt, "--out", tmp_path / "out", "--push-to-hub", "../../etc"], 2,
            "--push-to-hub: expected a Hub repo id 'namespace/name'")
    assert not (tmp_path / "out").exists()
    from dipnet.launch.local import choose_master_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{choose_master_port(None)}")
    monkeypatch.setenv("HF_TOKEN", "hf_dipnetTestTokenNeverPrinted")
    rc, out, err = cli(capsys, "export", ckpt, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-dip")
    line = err.strip()
    assert rc == 1 and "\n" not in line and line.startswith("error: push to me/tiny-dip failed ("), err
    assert f"the export in {tmp_path / 'out'} is complete" in line
    assert "hf_dipnetTestTokenNeverPrinted" not in out + err
    assert (tmp_path / "out" / "README.md").is_file() and json.loads((tmp_path / "out" / "export.json").read_text())


def test_processor_files_travel_only_as_regular_files(tmp_path):
    """Convert and export copy a model dir's processor configs beside its tokenizer; a symlinked
    one (which would copy whatever it points at into our output) is left behind, a directory named
    like one is ignored, and a config.json whose `architectures` is not a list of names does not
    crash the explanation of a failed vLLM start."""
    from dipnet.eval.vllm_runner import model_class_problem
    from dipnet.pipeline.models import copy_tokenizer_files

    src, dst = tmp_path / "model", tmp_path / "out"
    src.mkdir(), dst.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the export")
    (src / "processor_config.json").write_text('{"processor_class": "Gemma3Processor"}')
    (src / "preprocessor_config.json").symlink_to(secret)
    (src / "tokenizer.json").mkdir()
    copy_tokenizer_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["processor_config.json"]
    assert model_class_problem({"architectures": [["LlamaForCausalLM"], {"x": 1}, 3]}) is None
    assert model_class_problem(["not", "a", "dict"]) is None


# ----------------------------------------------------------------------------- GGUF headers

def _gguf_header(arch: bytes = b"llama") -> bytes:
    """A GGUF v3 header: no tensors, one string key (general.architecture) and one array key."""
    import struct

    key = b"general.architecture"
    vocab = b"tokenizer.ggml.tokens"
    return (struct.pack("<4sIQQ", b"GGUF", 3, 0, 2)
            + struct.pack("<Q", len(vocab)) + vocab + struct.pack("<IIQ", 9, 8, 2)  # an array of 2 strings
            + struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 2) + b"bc"
            + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(arch)) + arch)


def test_the_gguf_header_reader_skips_arrays_and_reads_the_keys_asked():
    from dipnet.pipeline.pretrained import gguf_architecture, gguf_metadata

    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(_gguf_header(b"gemma3"))
        f.flush()
        assert gguf_architecture(Path(f.name)) == "gemma3"
        assert gguf_metadata(Path(f.name), {"tokenizer.ggml.tokens", "absent"}) == {"tokenizer.ggml.tokens": None}


@pytest.mark.parametrize("damage", ["not GGUF", "cut short", "a string longer than the file", "array of 2^60 strings",
                                    "version 1", "empty"])
def test_a_damaged_gguf_is_refused_in_one_line(capsys, tmp_path, damage):
    """The header is read by dipnet itself (lengths come from the file): every damage is one line,
    exit 2, and nothing is written."""
    import struct

    good = _gguf_header()
    data = {"not GGUF": b"PK\x03\x04" + good[4:],
            "cut short": good[:-3],
            "a string longer than the file": good[:24] + struct.pack("<Q", 1 << 62) + good[32:],
            "array of 2^60 strings": good[:24 + 8 + 21 + 8] + struct.pack("<Q", 1 << 60) + good[24 + 8 + 21 + 16:],
            "version 1": good[:4] + struct.pack("<I", 1) + good[8:],
            "empty": b""}[damage]
    f = tmp_path / "model.gguf"
    f.write_bytes(data)
    refused(capsys, ["base", "import", f, "--out", tmp_path / "out"], 2, "not a readable GGUF file")
    assert not (tmp_path / "out").exists()
