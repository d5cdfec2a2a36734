"""Run by tests/test_gpu_node.py on two ranks (torchrun): what DeepSpeed hands the optimizer as λ's
gradient under bf16 ZeRO-2/3, against the exact sum of the bf16 micro-batch gradients.

Each engine trains a DistributionalInputProjection feeding a linear layer, in bf16, for 2 optimizer
steps of 8 micro-batches on each rank. A hook on λ's parameter records every micro-batch gradient
autograd produces (bf16, already divided by the accumulation steps, as DeepSpeed's backward
scales the loss); the reference sums them in float64 over micro-batches and ranks. Compared per
feature: the gradient DeepSpeed holds at the step (`safe_get_full_grad`) and λ's update (the
float32 master before and after the step) against AdamW run in float64 on the reference gradient.
Writes one JSON line per configuration to argv[1] from rank 0.
"""

import json
import sys

import torch
from torch import nn

from dipnet.launch.ds_config import build_ds_config
from dipnet.pipeline.dip import DistributionalInputProjection
from dipnet.pipeline.env import import_deepspeed
from dipnet.pipeline.recipe import Recipe, apply_overrides

HIDDEN, TOKENS, ACCUM, STEPS, LR, BETAS, EPS = 256, 32, 8, 2, 1e-3, (0.9, 0.95), 1e-8


def run(stage: int, dipnet_settings: bool, world: int, rank: int) -> dict:
    deepspeed = import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    torch.manual_seed(0)  # the same model on every rank
    dip = DistributionalInputProjection(HIDDEN, init_variance=0.01)
    model = nn.Sequential(dip, nn.Linear(HIDDEN, HIDDEN)).to(torch.bfloat16)
    lam = dip.log_variance_offset
    optimizer = torch.optim.AdamW([{"params": [model[1].weight, model[1].bias]},
                                   {"params": [lam]}], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    train = Recipe.model_validate(apply_overrides({}, {
        "train.zero_stage": stage, "train.precision": "bf16", "train.micro_batch_size": 1,
        "train.grad_accum": ACCUM, "train.grad_clip": 0.0})).train
    cfg = build_ds_config(train, world, "cpu", accum=ACCUM)
    if not dipnet_settings:  # DeepSpeed's own default: gradients kept and reduced in bf16
        cfg.pop("data_types", None)
        cfg.pop("communication_data_type", None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)

    seen = []
    lam.register_hook(lambda g: seen.append(g.detach().double().clone()))
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    torch.manual_seed(100 + rank)  # and its own noise
    ref_m = ref_v = None
    master = safe_get_full_fp32_param(lam).double()
    worst = {"grad": 0.0, "update": 0.0}
    off = {"grad": 0, "update": 0}
    for step in range(1, STEPS + 1):
        seen.clear()
        for micro in range(ACCUM):
            x = torch.randn(1, TOKENS, HIDDEN, generator=data).to(torch.bfloat16)
            target = torch.randn(1, TOKENS, HIDDEN, generator=data).to(torch.bfloat16)
            loss = (engine(x).float() - target.float()).pow(2).mean()
            engine.backward(loss)
            if micro < ACCUM - 1:
                engine.step()  # DeepSpeed counts micro-steps here; it steps at the boundary only
        ref = torch.stack(seen).sum(0)
        torch.distributed.all_reduce(ref)  # float64 over gloo
        ref /= world
        # With bf16 accumulation ZeRO-2 builds its gradient partition inside step(): only the update
        # can be read there.
        got_grad = safe_get_full_grad(lam).double() if dipnet_settings else None
        engine.step()
        # AdamW in float64 on the exact gradient, from the same master value
        ref_m = (1 - BETAS[0]) * ref if ref_m is None else BETAS[0] * ref_m + (1 - BETAS[0]) * ref
        ref_v = (1 - BETAS[1]) * ref**2 if ref_v is None else BETAS[1] * ref_v + (1 - BETAS[1]) * ref**2
        m_hat, v_hat = ref_m / (1 - BETAS[0] ** step), ref_v / (1 - BETAS[1] ** step)
        want_update = -LR * m_hat / (v_hat.sqrt() + EPS)
        new_master = safe_get_full_fp32_param(lam).double()
        got_update = new_master - master
        master = new_master
        for what, got, want in (("grad", got_grad, ref), ("update", got_update, want_update)):
            if got is None:
                continue
            # float32 rounding of the master itself (|master| ~ LR) is the floor for the update
            floor = 1e-6 * ref.abs().max() if what == "grad" else 4 * torch.finfo(torch.float32).eps * LR * step
            rel = (got - want).abs() / (want.abs() + floor)
            worst[what] = max(worst[what], float(rel.max()))
            off[what] = max(off[what], int((rel > 0.01).sum()))
    engine.destroy()
    return {"stage": stage, "dipnet_settings": dipnet_settings, "features": HIDDEN,
            "worst_relative_error": worst, "features_off_by_over_1pct": off,
            "grad_accum_dtype": str(engine.optimizer.gradient_accumulation_dtype)
            if hasattr(engine.optimizer, "gradient_accumulation_dtype") else None}


def main() -> None:
    from dipnet.pipeline.train import setup_distributed

    rank, world, _, _ = setup_distributed("cpu")  # as the trainer does (gloo; no shared-memory op to compile)
    results = [run(stage, mine, world, rank) for stage, mine in ((2, True), (3, True), (2, False))]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
