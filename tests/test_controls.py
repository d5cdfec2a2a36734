"""Controls at matched noise (#24 item 3): dip_matched and dip_shuffled replay a dip run's final λ
(same seed) with its per-feature structure removed, trained after it in the same `dipnet run`,
fixed through training, and exported like dip's λ."""

import json

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import load_recipe
from dipnet.pipeline.run import run_pipeline

CONTROLS = {
    "run": {"seed": 0},
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    # λ at a high learning rate: six steps leave a per-feature structure for the controls to remove.
    "dip": {"lr_scale": 300.0, "trajectories": 2, "antithetic": True},
    "train": {"max_steps": 6, "micro_batch_size": 4, "save_every": 6, "log_every": 1, "zero_stage": 1},
    "launch": {"launcher": "single"},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 16, "eval_base": False},
    "report": {"smoothness": False, "baseline": "dip"},
}
VARIANTS = {"dip": {}, "matched": {"dip.method": "dip_matched", "dip.source": "dip"},
            "shuffled": {"dip.method": "dip_shuffled", "dip.source": "dip"}}


@pytest.mark.slow
def test_controls_replay_the_dip_runs_final_lambda(tmp_path, tiny_base_dir):
    p = write_recipe(tmp_path, "controls", CONTROLS)
    raw = json.loads(json.dumps(load_recipe(p).to_dict()))
    raw["variants"] = VARIANTS
    p.write_text(json.dumps(raw))
    recipe = load_recipe(p)
    run_pipeline(recipe, progress=False)
    train, export = tmp_path / "controls" / "train", tmp_path / "controls" / "export"

    dip = load_file(str(train / "dip-s0" / "lambda.safetensors"))
    assert dip and all(v.std() > 0.05 for v in dip.values())  # λ learned a per-feature structure
    matched = load_file(str(train / "matched-s0" / "lambda_init.safetensors"))
    shuffled = load_file(str(train / "shuffled-s0" / "lambda_init.safetensors"))
    assert sorted(matched) == sorted(shuffled) == sorted(dip)
    for name, log_var in dip.items():
        mean_lambda = log_var.exp().mean()
        assert torch.allclose(matched[name].exp(), mean_lambda.expand_as(log_var), rtol=1e-6)  # same total noise
        assert torch.equal(shuffled[name].sort().values, log_var.sort().values)              # same λ, other features
        assert not torch.equal(shuffled[name], log_var)
    for run, init in (("matched", matched), ("shuffled", shuffled)):
        final = load_file(str(train / f"{run}-s0" / "lambda.safetensors"))
        assert all(torch.equal(final[k], init[k]) for k in init), run  # fixed through training (learning rate 0)
        exported = load_file(str(export / f"{run}-s0" / "dip" / "dip.safetensors"))
        assert all(torch.allclose(exported[k], init[k], atol=1e-6) for k in init), run
        cfg = json.loads((export / f"{run}-s0" / "dip" / "dip_config.json").read_text())
        assert cfg["method"] == {"matched": "dip_matched", "shuffled": "dip_shuffled"}[run]

    # The report reads what the noise costs: the controls carry dip's total variance per projection,
    # and λ's structure is dip's alone (the curvature correlation is only asked of learned λ).
    report = json.loads((tmp_path / "controls" / "report.json").read_text())["lambda_diagnostics"]
    assert set(report) == {"dip", "matched", "shuffled"}
    assert report["matched"]["lambda_mean"] == pytest.approx(report["dip"]["lambda_mean"], rel=1e-5)
    assert report["shuffled"]["lambda_mean"] == pytest.approx(report["dip"]["lambda_mean"], rel=1e-5)
    assert report["dip"]["curvature_rho"] is not None and report["matched"]["curvature_rho"] is None
    assert all(d["noise_cost"] == d["noise_cost"] for d in report.values())
    assert (tmp_path / "controls" / "report" / "lambda_hist_dip.png").is_file()

    # A control names a dip run: a variant that is not one is refused in one line, before training.
    raw["variants"]["matched"]["dip.source"] = "shuffled"
    p.write_text(json.dumps(raw))
    with pytest.raises(UsageError, match="dip.source 'shuffled': a control replays a dip run"):
        run_pipeline(load_recipe(p), only="train", progress=False)


def test_a_control_replays_a_model_directory(tmp_path):
    """dip.source may name a model directory (an export) instead of a variant: its dip/ λ."""
    from dipnet.pipeline import dip
    from dipnet.pipeline.run import Run

    src = tmp_path / "exported"
    state = {"0.dip_input": torch.linspace(-7, -3, 16), "1.dip_input": torch.linspace(-6, -4, 16)}
    dip.save_dip(None, dip.DipConfig(), src, state=state)
    p = write_recipe(tmp_path, "c", CONTROLS, {"dip": {"method": "dip_shuffled", "source": str(src)}})
    run = Run(load_recipe(p), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    run.write_control_lambda(run.runs[0][2], 0, out)
    got = load_file(str(out / "lambda_init.safetensors"))
    assert all(torch.equal(got[k].sort().values, state[k].sort().values) and not torch.equal(got[k], state[k])
               for k in state)
    # A source that is neither a variant nor a model directory: refused when the recipe is read.
    p = write_recipe(tmp_path, "c2", CONTROLS, {"dip": {"method": "dip_matched", "source": str(tmp_path / "nothing")}})
    with pytest.raises(UsageError, match="'dip.source': '.*nothing' is neither a variant of this recipe nor a model"):
        load_recipe(p)
