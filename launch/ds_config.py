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


# Settings that differ between GPU nodes and CPU ranks (gloo). On GPUs, overlapping the
# gradient reduction with the backward pass and keeping small parameters resident under ZeRO-3
# are what make it fast; on CPU ranks there is no separate stream to overlap on, and a zero
# persistence threshold keeps the ZeRO-3 tests exercising partitioning of every parameter.
DEVICE_SETTINGS = {
    "cuda": {"overlap_comm": True, "stage3_param_persistence_threshold": 100_000},
    "cpu": {"overlap_comm": False, "stage3_param_persistence_threshold": 0},
}


def build_ds_config(train, world_size: int, device: str = "cpu", accum: int | None = None) -> dict:
    """The filled DeepSpeed config dict for `train` settings on `world_size` ranks of `device`.

    `accum` is the gradient accumulation the trainer derived (train.global_batch_size); default
    train.grad_accum."""
    cfg = json.loads(template_path(train.zero_stage, train.offload).read_text())
    accum = train.grad_accum if accum is None else accum
    fill = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": train.micro_batch_size * accum * world_size,
        "gradient_clipping": train.grad_clip,
    }
    for k, v in fill.items():
        if cfg.get(k) == "auto":
            cfg[k] = v
    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = train.precision == "bf16"
    if train.precision == "bf16" and train.zero_stage >= 2:
        # Gradients are reduced and accumulated in float32, not bf16: λ's per-feature gradients
        # are small (summed over ~N features they make one NLL change) and bf16 keeps 8 bits of
        # them. Costs 4 bytes per parameter / ranks of gradient partition and twice the
        # reduction traffic; LoRA's adapters make both negligible. (ZeRO-1 would switch to
        # DeepSpeed's BF16_Optimizer and ZeRO-0 refuses the mix, so they keep bf16 gradients.)
        cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
        cfg["communication_data_type"] = "fp32"
    zero = cfg.get("zero_optimization", {})
    for k, v in DEVICE_SETTINGS["cuda" if device == "cuda" else "cpu"].items():
        if zero.get(k) == "auto":
            zero[k] = v
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
