"""The `export` stage: a DeepSpeed checkpoint (any ZeRO stage) -> one Hugging Face model directory.

    dipnet export RUN/train/main/checkpoints/step-000300 --out DIR     (or the train directory)

1. `consolidate_zero_checkpoint` gathers the fp32 weights of every rank's shards (DeepSpeed's
   zero_to_fp32; ZeRO-0 reads the single model file).
2. The trained model is rebuilt exactly as `train.py` built it (base + DIP + LoRA) and loaded
   strictly: a missing, unexpected or wrong-shaped key is an error naming it.
3. LoRA is merged; DIP in mean mode is the base architecture, so the base weights go to the
   top-level safetensors (vLLM and any tool read them as they are) and λ to `dip/`.
4. Checks: the export reloads with plain `transformers` with no missing/unexpected/mismatched
   key, and its logits on a probe batch match the trained model's mean-mode logits within
   `export.tolerance` (1e-5) x max(1, max |logit|). Full fine-tunes match exactly; merged LoRA
   differs by float32 round-off. The directory is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.errors import RunError, UsageError

PROBE_TEXTS = ["Question: Ann has 3 apples. She buys 4 more. How many apples does Ann have now?\nAnswer:",
               "Question: What is 12 + 7?\nAnswer: 12 + 7 = 19\n#### 19"]


@contextlib.contextmanager
def weights_only_torch_load():
    """Force `torch.load(weights_only=True)` inside DeepSpeed's checkpoint utilities.

    They call torch.load(weights_only=False); our checkpoints hold only tensors, plain Python
    data and three DeepSpeed plain-data classes, which are allow-listed here.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (step-N) from itself, its `checkpoints/` parent or the train dir."""
    from dipnet.pipeline.train import latest_checkpoint

    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            ck = latest_checkpoint(root)
            if ck is not None:
                return ck
    raise UsageError(f"{p}: no complete checkpoint (expected a step-N directory with trainer_state.json)")


def consolidate_zero_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the engine's module from a checkpoint of any ZeRO stage."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tag = ckpt.name
    if state["zero_stage"] == 0:
        files = sorted((ckpt / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise RunError(f"{ckpt / tag}: no mp_rank_*_model_states.pt")
        sd = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_torch_load():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    return {k: v.float() for k, v in sd.items()}


def _probe_logits(model, tokenizer) -> torch.Tensor:
    tokenizer.padding_side = "right"
    batch = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return logits * batch["attention_mask"].unsqueeze(-1)


def export_checkpoint(path: str | Path, out_dir: str | Path, *, dtype: str = "float32", tolerance: float = 1e-5) -> dict:
    """Consolidate, merge, save and verify. Returns the export summary (also export.json)."""
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline.convert import load_tokenizer, save_model_dir
    from dipnet.pipeline.recipe import Recipe
    from dipnet.pipeline.train import setup_model

    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    recipe = Recipe.model_validate(state["recipe"])
    model_dir = state["model_dir"]
    weights = consolidate_zero_checkpoint(ckpt)

    model, dip_config = setup_model(recipe, model_dir)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RunError(f"{ckpt}: checkpoint does not match the model: "
                       f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} "
                       f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise RunError(f"{ckpt}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(weights, strict=True)
    dipmod.set_dip_mode(model, "mean")
    tokenizer = load_tokenizer(model_dir)
    trained_logits = _probe_logits(model, tokenizer)
    lam = dipmod.dip_state(model)

    if recipe.train.method == "lora":
        model = model.merge_and_unload()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = save_model_dir(model, dip_config, model_dir, out_dir, dtype=torch_dtype if dtype != "float32" else None)

    # Verify the directory as any tool would read it: plain transformers, strict key check.
    plain, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        shutil.rmtree(out, ignore_errors=True)
        kind, keys = next(iter(problems.items()))
        raise RunError(f"export {out}: {kind.replace('_', ' ')}: {sorted(keys)[0]}")
    n_tensors = len(plain.state_dict())
    exported_logits = _probe_logits(plain, tokenizer)
    max_diff = (exported_logits - trained_logits).abs().max().item()
    # Relative to the logits' scale: a merged LoRA computes x·(W + s·BA) instead of
    # x·W + s·(x·A)·B, which moves float32 logits of magnitude ~10 by ~1e-5.
    scale = max(1.0, trained_logits.abs().max().item())
    tol = (tolerance if dtype == "float32" else max(tolerance, 5e-2)) * scale
    if not max_diff <= tol:
        shutil.rmtree(out, ignore_errors=True)
        raise RunError(f"export {out}: logits differ from the trained mean path by {max_diff:.3g} (> {tol:g})")
    summary = {"checkpoint": str(ckpt), "step": state["step"], "model_dir": model_dir, "out": str(out),
               "zero_stage": state["zero_stage"], "train_method": recipe.train.method, "dip_method": recipe.dip.method,
               "tensors": n_tensors, "parameters": sum(p.numel() for p in plain.parameters()),
               "dip_projections": len(lam), "max_logit_diff": max_diff, "logit_scale": scale, "tolerance": tol,
               "dtype": dtype}
    tmp = out / "export.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "export.json")
    return summary
