"""The DeepSpeed config, generated from the recipe in exactly one place.

The shipped templates in `launch/ds/` (package data of dipnet.launch) (zero0..3, zero2/3_offload) hold "auto" for batch size,
accumulation, clipping and precision; `build_ds_config` fills them from `train.*` and checks
global batch = micro batch x accumulation x world size.
"""

from __future__ import annotations

import json
from pathlib import Path

from dipnet.pipeline.errors import UsageError

DS_DIR = Path(__file__).resolve().parent / "ds"  # package data: found in a wheel install too


def template_path(zero_stage: int, offload: bool) -> Path:
    if offload and zero_stage < 2:
        raise UsageError("train.offload needs train.zero_stage 2 or 3")
    name = f"zero{zero_stage}{'_offload' if offload else ''}.json"
    p = DS_DIR / name
    if not p.is_file():  # installed without the repo's launch/ folder
        raise UsageError(f"DeepSpeed config template missing: {p}")
    return p


def build_ds_config(train, world_size: int) -> dict:
    """The filled DeepSpeed config dict for `train` settings on `world_size` ranks."""
    cfg = json.loads(template_path(train.zero_stage, train.offload).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
    }
    for k, v in fill.items():
        if cfg.get(k) == "auto":
            cfg[k] = v
    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = train.precision == "bf16"
    if train.offload:
        # A client optimizer that is not DeepSpeed's CPU Adam is refused with offload; we pass
        # DeepSpeedCPUAdam (see train.build_optimizer).
        cfg["zero_force_ds_cpu_optimizer"] = True
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise UsageError(f"{template_path(train.zero_stage, train.offload)}: 'auto' left unfilled at {leftover[0]}")
    return cfg


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
