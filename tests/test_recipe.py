"""Recipe validation: the shipped recipes, overrides, and bad recipes with their exact messages."""

import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import expand_runs, load_recipe, parse_override

TINY = REPO / "recipes" / "tiny-arith.yaml"


def test_shipped_recipe_validates():
    r = load_recipe(TINY)
    assert r.run.name == "tiny-arith" and str(r.output_dir) == "runs/tiny-arith"
    runs = expand_runs(r)
    assert [(v, s) for v, s, _ in runs] == [(v, s) for s in (0, 1, 2) for v in ("sft", "dip")]  # interleaved
    sft = next(rr for v, _, rr in runs if v == "sft")
    assert sft.dip.method == "none" and sft.train.lr == r.train.lr
    assert r.launch.timeout_s is None  # no silent cap on a local run (a paper recipe trains for hours)


def test_overrides_typed_and_nested():
    r = load_recipe(TINY, ["train.lr=1e-4", "dip.alpha=0.1", "eval.tasks=[arith-id]", "run.name=x"])
    assert r.train.lr == 1e-4 and r.dip.alpha == 0.1 and r.eval.tasks == ["arith-id"]
    assert str(r.output_dir) == "runs/x"
    assert parse_override("a.b=") == ("a.b", "")


BAD = [
    ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"dip": {"init_varaince": 0.1}}, "unknown key 'dip.init_varaince' (did you mean 'dip.init_variance'?)"),
    ({"train": {"lr": "fast"}}, "'train.lr': expected a number, got 'fast'"),
    ({"train": {"max_steps": 0}}, "'train.max_steps': expected a value > 0, got 0"),
    ({"train": {"micro_batch_size": -2}}, "'train.micro_batch_size': expected a value > 0, got -2"),
    ({"train": {"zero_stage": 4}}, "'train.zero_stage': expected a value <= 3, got 4"),
    ({"dip": {"gamma": 0.01}}, "dip.gamma > 0 needs dip.trajectories >= 2"),
    ({"dip": {"method": "dipp"}}, "'dip.method': expected one of 'none', 'input_noise', 'neftune', 'dip_fixed', 'dip', "
                                  "'dip_matched' or 'dip_shuffled', got 'dipp'"),
    ({"dip": {"prior_strength": 0.02}}, "dip.prior_strength and dip.prior_variance go together"),
    ({"dip": {"prior_strength": 0.02, "prior_variance": 0.01, "alpha": 0.5}},
     "dip.alpha: dip.prior_strength/prior_variance replace alpha, beta and prior_reduction; set one form"),
    ({"dip": {"antithetic": True}}, "dip.antithetic pairs trajectories: dip.trajectories must be even, got 1"),
    ({"dip": {"method": "dip_matched"}}, "dip.source names the dip run a control replays"),
    ({"variants": {"sft": {}, "m": {"dip.method": "dip_matched", "dip.source": "dipp"}}},
     "'dip.source': 'dipp' is neither a variant of this recipe nor a model directory with dip/dip.safetensors"),
    ({"variants": {"sft": {}, "dip": {}}, "report": {"primary": {"variant": "dip", "against": "x", "task": "arith-id"}}},
     "'report.primary': 'x' is not one of the variants ['dip', 'sft']"),
    ({"variants": {"sft": {}, "dip": {}}, "report": {"primary": {"variant": "dip", "against": "sft", "task": "gsm8k"}}},
     "'report.primary.task': 'gsm8k' is not one of eval.tasks"),
    ({"dip": {"scale": "log"}}, "'dip.scale': expected one of 'absolute' or 'relative', got 'log'"),
    ({"data": {"packing": "maybe"}}, "'data.packing': expected true or false, got 'maybe'"),
    ({"data": {"train": "/nonexistent/train.jsonl"}}, "'data.train': no such file: /nonexistent/train.jsonl"),
    ({"data": {"train": [{"path": "synthetic"}, {"path": "/nonexistent/b.jsonl"}]}},
     "'data.train.1.path': no such file: /nonexistent/b.jsonl"),
    ({"data": {"train": [{"path": "synthetic", "weight": 0}]}}, "'data.train.0.weight': expected a value > 0.0, got 0"),
    ({"data": {"train": [{"path": "synthetic", "wieght": 2}]}},
     "unknown key 'data.train.0.wieght' (did you mean 'data.train.0.weight'?)"),
    ({"data": {"train": [{"path": "synthetic", "format": "sharegtp"}]}}, "'data.train.0.format': expected one of"),
    ({"data": {"train": []}}, "data.train: an empty mixture (list at least one {path, weight})"),
    ({"data": {"train": 5}}, "'data.train': expected a string, got 5"),
    ({"eval": {"samples": 4}}, "eval.samples 4 needs eval.temperature > 0 (greedy samples are all the same)"),
    ({"eval": {"samples": 4, "temperature": 0.5, "k": [8]}}, "eval.k: 8 is not between 1 and eval.samples (4)"),
    ({"eval": {"top_p": 0}}, "'eval.top_p': expected a value > 0"),
    ({"train": {"report_to": ["comet"]}}, "'train.report_to.0': expected one of 'tensorboard', 'wandb', 'mlflow' or 'trackio'"),
    ({"model": {"base": "/nonexistent/model"}}, "'model.base': no such model directory: /nonexistent/model"),
    ({"eval": {"tasks": ["arith-xyz"]}}, "'eval.tasks.0': expected one of"),
    ({"eval": {"dip_mode": "average:0"}}, "'eval.dip_mode': expected 'mean' or 'average:K'"),
    ({"variants": {"a": {"train.lrr": 1}}}, "(variant 'a'): unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"train": {"max_steps": None}}, "set train.max_steps or train.epochs"),
    ({"launch": {"master_port": 70000}}, "'launch.master_port': expected a value < 65536, got 70000"),
    ({"launch": {"timeout_s": 0}}, "'launch.timeout_s': expected a value > 0, got 0"),
    ({"train": {"eval_every": 5}}, "train.eval_every needs validation data: data.validation or data.validation_fraction"),
    ({"train": {"keep_best": True}}, "train.keep_best and train.early_stopping_patience need train.eval_every"),
    ({"data": {"validation_fraction": 1.5}}, "'data.validation_fraction': expected a value < 1.0, got 1.5"),
    ({"data": {"validation": "/nonexistent/val.jsonl"}}, "'data.validation': no such file: /nonexistent/val.jsonl"),
    ({"data": {"validation": "synthetic"}}, "'data.validation': synthetic data has no validation split"),
    ({"data": {"packing_cross_document": True}}, "data.packing_cross_document needs data.packing: true"),
    ({"train": {"gradient_checkpointing": "yes please"}}, "'train.gradient_checkpointing': expected true or false"),
    ({"model": {"attn_implementation": "flash"}}, "'model.attn_implementation': expected one of 'auto', 'sdpa'"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipes_have_exact_messages(tmp_path, raw, message):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError) as e:
        load_recipe(p)
    text = str(e.value)
    assert message in text, text
    assert text.startswith(str(p)) and "\n" not in text


def test_a_study_sharing_seeds_with_its_sweep_is_refused(tmp_path):
    """study.tuned_by names the sweep that chose the settings: reporting its seeds would report the
    runs the choice was made on."""
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"seeds": [0, 1, 2]}))
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump({"study": {"tuned_by": "sweep.yaml"}, "seeds": [2, 3]}))
    with pytest.raises(UsageError, match=r"'seeds': \[2\] were also the seeds of sweep.yaml, which chose this recipe's"):
        load_recipe(p)
    p.write_text(yaml.safe_dump({"study": {"tuned_by": "sweep.yaml"}, "seeds": [10, 11]}))
    assert load_recipe(p).seeds == [10, 11]
    p.write_text(yaml.safe_dump({"study": {"tuned_by": "nosuch.yaml"}, "seeds": [10]}))
    with pytest.raises(UsageError, match="'study.tuned_by': nosuch.yaml is not a recipe file"):
        load_recipe(p)
    assert load_recipe(REPO / "recipes" / "study-arith.yaml").study.tuned_by  # the shipped study says what tuned it


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("run:\n  name: a\n  seed: [1,\n")
    with pytest.raises(UsageError, match=r"r.yaml: line \d+: invalid YAML"):
        load_recipe(p)


@pytest.mark.parametrize("args,needle", [
    (["validate", "recipes/tiny-arith.yaml", "trian.lr=1"], "unknown key 'trian' (did you mean 'train'?)"),
    (["validate", "recipes/missing.yaml"], "recipes/missing.yaml: no such recipe file"),
    (["validate", "recipes/tiny-arith.yaml", "train.zero_stage=4"], "'train.zero_stage': expected a value <= 3"),
    (["valdate", "recipes/tiny-arith.yaml"], "unknown command 'valdate' (did you mean 'validate'?)"),
])
def test_cli_validate_errors_one_line_exit_2(tmp_path, args, needle):
    before = set(Path(REPO).glob("runs/*"))
    res = run_cli(*args, cwd=REPO)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert set(Path(REPO).glob("runs/*")) == before  # nothing written


def test_cli_validate_ok():
    res = run_cli("validate", "recipes/tiny-arith.yaml", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "ok (6 training run(s)" in res.stdout


PAPER = sorted((REPO / "recipes" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_recipes_validate_and_render(path):
    r = load_recipe(path)
    assert r.train.method == "lora" and r.train.zero_stage == 2 and r.train.precision == "bf16"
    assert r.eval.tasks == ["gsm8k"] and r.eval.shots == 5 and r.seeds == [0, 1, 2]
    assert set(r.variants) == {"sft", "dip", "dip_matched", "dip_fixed"} and r.train.epochs == 1
    assert r.launch.device == "cuda"  # `dipnet run` on one 8-GPU machine too: never 8 CPU ranks for a 7B model
    # λ can reach its equilibrium within the one epoch (#24 item 5): Adam moves ln λ by at most
    # its learning rate a step, so the schedule's sum bounds the travel. GSM8K train has 7,473 rows.
    from dipnet.pipeline.train import lr_factor, total_steps, warmup_steps

    rows = 7473 - round(7473 * r.data.validation_fraction)
    steps = total_steps(r, rows, r.launch.procs_per_node)
    warm = warmup_steps(r.train, steps)
    travel = r.train.lr * r.dip.lr_scale * sum(lr_factor(i, warm, steps) for i in range(steps))
    assert steps == 58 and travel >= math.log(10), (steps, travel)
    assert r.dip.antithetic and r.dip.trajectories == 2 and r.dip.prior_strength and r.dip.rms_clip
    assert r.report.primary.variant == "dip" and r.report.primary.against == "sft"
    res = run_cli("launch", path, "--slurm", "--dry-run", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --gpus-per-node=8" in res.stdout and "#SBATCH --nodes=1" in res.stdout
    assert "export DIPNET_PROCS_PER_NODE=8" in res.stdout and "--only train" in res.stdout


def test_sweep_recipe_validates():
    r = load_recipe(REPO / "recipes" / "sweep-lambda.yaml")
    assert len(expand_runs(r)) == 20 and r.dip.scale == "relative"
    sweep = load_recipe(REPO / "recipes" / "sweep-arith.yaml")
    assert len(expand_runs(sweep)) == 66 and sweep.eval.tasks == ["arith-val"]  # selection on validation only
    study = load_recipe(REPO / "recipes" / "study-arith.yaml")
    methods = {v: rr.dip.method for v, _, rr in expand_runs(study)}
    assert {"dip_matched", "dip_shuffled", "dip_fixed", "dip"} <= set(methods.values())
    assert not set(study.seeds) & set(sweep.seeds) and "arith-val" not in study.eval.tasks
    assert study.report.primary.variant == "dip" and study.report.primary.against == "dip_matched"
    confirm = load_recipe(REPO / "recipes" / "confirm-arith.yaml")  # the study's lead, on seeds neither used
    assert not set(confirm.seeds) & (set(sweep.seeds) | set(study.seeds))
    assert (confirm.report.primary.variant, confirm.report.primary.against) == ("dip_fixed", "sft")
    arms = {v: rr.dip for v, _, rr in expand_runs(confirm)}
    assert arms["dip_fixed"].init_variance == 1e-2 and arms["dip_fixed"].antithetic and arms["sft"].method == "none"


def test_real_model_recipe_validates():
    """recipes/smollm2-gsm8k.yaml: the real-model study docs/results.md reports (its run takes ~30 min,
    so the suite checks the recipe; tests/test_real_model.py runs every stage on the real model)."""
    from conftest import SHARED_GSM8K

    if not (SHARED_GSM8K / "train.jsonl").is_file():
        with pytest.raises(UsageError, match="data.train': no such file"):
            load_recipe(REPO / "recipes" / "smollm2-gsm8k.yaml")
        return
    r = load_recipe(REPO / "recipes" / "smollm2-gsm8k.yaml")
    assert r.model.base == "smollm2-135m-instruct" and r.data.train.endswith("gsm8k/train.jsonl")
    assert r.train.method == "lora" and r.train.zero_stage == 2 and r.launch.launcher == "deepspeed"
    assert r.launch.procs_per_node == 2 and r.eval.engine == "vllm" and r.eval.eval_base
    assert r.eval.tasks == ["gsm8k"] and r.eval.shots == 5 and r.eval.chat == "none"
    assert set(r.variants) == {"sft", "dip", "dip_matched", "dip_fixed"} and len(r.seeds) >= 2
    assert r.dip.antithetic and r.dip.rms_clip and r.study.tuned_by  # chosen on validation rows, not on these seeds
    sweep = load_recipe(REPO / r.study.tuned_by)
    assert sweep.data.validation_fraction == r.data.validation_fraction and not set(sweep.seeds) & set(r.seeds)
