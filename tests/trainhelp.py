"""Start real training runs from tests: preprocess once, then launch ranks like the train stage."""

import json
from pathlib import Path

from dipnet.launch import local as launch
from dipnet.pipeline.base_model import tiny_base
from dipnet.pipeline.data import preprocess
from dipnet.pipeline.recipe import Recipe, apply_overrides

BASE_TRAIN = {
    "data.synthetic.n_train": 96, "data.synthetic.n_test": 16, "data.max_length": 96,
    "train.micro_batch_size": 4, "train.log_every": 1, "train.warmup_steps": 2, "train.lr": 2e-3,
    "dip.init_variance": 0.01,  # the tests check λ against this value
    # torchrun: one launcher process. The deepspeed launcher starts two more Python processes
    # (runner, then launch.py, each importing torch and deepspeed) before any rank; it has tests
    # of its own (test_faults, test_launch, test_slurm*). What these tests check is training.
    "launch.launcher": "torchrun",
}


def make_recipe(overrides: dict) -> Recipe:
    return Recipe.model_validate(apply_overrides({}, {**BASE_TRAIN, **overrides}))


def train(out: Path, overrides: dict, procs: int = 2, env: dict | None = None, model_dir=None, timeout: int = 600):
    """Run the training entry point (dipnet.pipeline.train) on `procs` ranks into `out`; raises RunError if it fails."""
    r = make_recipe(overrides)
    base = model_dir or tiny_base(r.model.tiny, progress=False)
    meta = preprocess(r.data, base, out.parent / "_preprocessed")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(r.to_dict()))
    port = launch.choose_master_port(None)
    cmd = launch.train_command(r.launch, procs, port, ["--recipe", str(out / "recipe.json"), "--model", str(base),
                                                       "--data", meta["path"], "--out", str(out)])
    e = launch.rank_env(procs, port)
    e.update(env or {})
    launch.run_ranks(cmd, e, out / "train.log", timeout, single=r.launch.launcher == "single", port=port)
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def train_many(runs: dict[Path, dict], procs: int = 2, timeout: int = 900) -> None:
    """Several runs in one launch (`--runs`), as a study's train stage starts them: {out: overrides}.
    One start-up (imports, process group) for all of them; every run shares the first one's data."""
    recipes = {out: make_recipe(over) for out, over in runs.items()}
    first = next(iter(recipes.values()))
    base = tiny_base(first.model.tiny, progress=False)
    outs = list(recipes)
    meta = preprocess(first.data, base, outs[0].parent / "_preprocessed")
    spec = []
    for out, r in recipes.items():
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(r.to_dict()))
        spec.append({"recipe": str(out / "recipe.json"), "out": str(out)})
    runs_file = outs[0].parent / f"runs-{outs[0].name}.json"
    runs_file.write_text(json.dumps(spec))
    port = launch.choose_master_port(None)
    cmd = launch.train_command(first.launch, procs, port, ["--runs", str(runs_file), "--model", str(base),
                                                           "--data", meta["path"]])
    launch.run_ranks(cmd, launch.rank_env(procs, port), outs[0].parent / f"train-{outs[0].name}.log", timeout,
                     single=first.launch.launcher == "single", port=port)
