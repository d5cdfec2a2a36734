"""Model set-up for training and for export's check: the base weights, the recipe's noise method
(DIP, its baselines), LoRA adapters, and the optimizer's parameter groups."""

from __future__ import annotations

import torch

from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.errors import RunError
from dipnet.pipeline.recipe import Recipe


def unfreeze_lambda(model, method: str) -> None:
    """peft freezes every non-adapter parameter; DIP's λ train alongside the adapters."""
    learn = method in ("dip",) + dipmod.CONTROLS  # a control's λ ride at learning rate 0
    for _, p in dipmod.projections(model):
        p.log_variance_offset.requires_grad_(learn)


def setup_model(recipe: Recipe, model_dir: str, *, trust_remote_code: bool, dtype=None, initial_lambda=None):
    """Base weights + the recipe's noise method (+ LoRA). λ come from model_dir/dip when the
    converted directory was made with the same DIP settings, else from dip.init_variance; a
    control's (dip_matched, dip_shuffled) from `initial_lambda` ({projection: ln λ}, their file).
    `trust_remote_code` is the caller's decision (the user's recipe or flag), never a file's."""
    from dipnet.pipeline.models import check_attn_implementation, load_causal_lm

    attn = recipe.model.attn_implementation
    check_attn_implementation(attn)
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, with_dip=False, dtype=dtype,
                           attn_implementation=None if attn == "auto" else attn)
    if recipe.train.gradient_checkpointing:
        # Each block keeps only its input and runs again in backward. torch's checkpoint restores
        # the RNG state before the rerun, so DIP's noise (drawn in the block's pre-hook, inside the
        # checkpointed call) is the same sample; the prior is computed outside the model, once.
        # Non-reentrant: LoRA's frozen inputs need no requires_grad trick, ZeRO-3 re-gathers weights.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = dipmod.DipConfig.from_settings(recipe.dip)
    saved = dipmod.read_dip_config(model_dir)
    if saved is not None and dipmod.same_noise(saved, config):
        dipmod.load_dip(model, model_dir)
    else:
        dipmod.attach_dip(model, config)
    for _, proj in dipmod.projections(model):
        proj.antithetic = recipe.dip.antithetic
    if initial_lambda is not None:  # a control's λ (train.py); export's check loads them from the checkpoint
        dipmod.set_dip_state(model, *initial_lambda)
    if recipe.train.method == "lora":
        from peft import LoraConfig, get_peft_model

        lc = recipe.train.lora
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in lc.target_modules if t not in present]
        if missing:
            raise RunError(f"train.lora.target_modules: '{missing[0]}' matches no module of the model")
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
        unfreeze_lambda(model, recipe.dip.method)
    model.config.use_cache = False
    return model, config


def build_optimizer(model, recipe: Recipe):
    """AdamW with two groups: the model's weights at train.lr, λ at train.lr × dip.lr_scale."""
    lam = [p for n, p in model.named_parameters() if p.requires_grad and "log_variance" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "log_variance" not in n]
    t = recipe.train
    groups = [{"params": rest, "lr": t.lr, "weight_decay": t.weight_decay, "base_lr": t.lr}]
    if lam:
        # A control (dip_matched, dip_shuffled) keeps its λ at learning rate 0: fixed, yet carried by
        # checkpoints (resume) and read by export where dip's trained λ are.
        lr = 0.0 if recipe.dip.method in dipmod.CONTROLS else t.lr * recipe.dip.lr_scale
        groups.append({"params": lam, "lr": lr, "weight_decay": 0.0, "base_lr": lr})
    if t.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.95), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))
