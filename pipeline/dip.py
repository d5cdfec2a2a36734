"""Distributional Input Projection (DIPNet, arXiv 2506.04690) for Hugging Face causal LMs.

A projection replaces a layer's input v by a sample u ~ N(v, diag(λ)), reparameterised as
u = v + sqrt(λ) ⊙ ε, with one learnable variance per feature (stored as log-variance so λ > 0).

- `DistributionalInputProjection`: the module (no knowledge of recipes or training).
- `attach_dip(model, ...)`: puts one projection on the input of every chosen decoder block
  (`block_input`; for block 0 that is the token embeddings) or on the residual stream entering
  the attention and MLP sub-blocks (`attn_mlp`), for any supported family. Projections are
  child modules of the decoder layers (`model.layers.3.dip_input`), so optimizers, ZeRO
  partitioning and state dicts see them like any other parameter, and forward pre-hooks apply
  them, so the model's own forward code is untouched.
- `dip_objective(...)`: mean NLL over m trajectories + Σ(α·λ − β·ln λ) (shifted to 0 at its
  minimum λ = β/α; `mean` reduction optional) + γ·variance.
- Baselines in the same framework: `input_noise` (fixed Gaussian on the embeddings only),
  `neftune` (uniform embedding noise scaled by α/sqrt(L·d)), `dip_fixed` (λ frozen), `none`.
- `save_dip` / `load_dip`: `dip/dip.safetensors` + `dip/dip_config.json` beside the base weights.
  They sit in a subdirectory because vLLM reads every top-level `*.safetensors`.

Why the relative scale exists: in a tiny Llama the embeddings' mean square was ~0.004 against
0.3-0.6 for deeper block inputs, so one absolute λ barely perturbs block 0 while swamping the
others. `scale="relative"` multiplies the noise by the per-token RMS of v (detached: the noise
scale is a unit, not a path through which the loss could reward shrinking activations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dipnet.pipeline.errors import UsageError

DIP_SUBDIR = "dip"
DIP_WEIGHTS = "dip.safetensors"
DIP_CONFIG = "dip_config.json"

# model_type -> (decoder-layer list path, attention-norm attr, MLP-norm attr). The MLP norm is
# the one whose input is the residual stream entering the MLP sub-block (Gemma's
# post_attention_layernorm normalises the attention output, so its MLP norm is another one).
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "mistral": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "qwen2": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "qwen3": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "phi3": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "gemma": ("model.layers", "input_layernorm", "post_attention_layernorm"),
    "gemma2": ("model.layers", "input_layernorm", "pre_feedforward_layernorm"),
    "gemma3_text": ("model.layers", "input_layernorm", "pre_feedforward_layernorm"),
    # Gemma 3 checkpoints from 4B up are image-text models; DIP goes on the language model.
    "gemma3": ("model.language_model.layers", "input_layernorm", "pre_feedforward_layernorm"),
    "gpt_neox": ("gpt_neox.layers", "input_layernorm", "post_attention_layernorm"),
    "gpt2": ("transformer.h", "ln_1", "ln_2"),
}
# Controls at matched noise (#24): λ fixed at a dip run's final values, with its learned structure
# removed: `dip_matched` gives every feature of a projection that projection's mean λ (the same
# total noise variance), `dip_shuffled` permutes the per-feature λ within each projection.
CONTROLS = ("dip_matched", "dip_shuffled")
METHODS = ("none", "input_noise", "neftune", "dip_fixed", "dip") + CONTROLS


class DistributionalInputProjection(nn.Module):
    """u = v + sqrt(λ)·ε for one layer's input, with λ one learnable variance per feature.

    Args:
        hidden_size: features of the input (λ has this shape).
        init_variance: initial λ for every feature.
        scale: "absolute" (λ in the hidden state's units, as in the paper) or "relative"
            (noise multiplied by the per-token RMS of v, so λ is dimensionless).
        learnable: False freezes λ (the `dip_fixed` and `input_noise` baselines).

    λ is stored as `log_variance_offset`, trained, with ln λ = ln(init_variance) + offset. The
    offset starts at 0, where bf16 is fine-grained: DeepSpeed casts every parameter to bf16 under
    `precision: bf16`, and a bf16 ln λ near ln 3e-3 moves in steps of 0.031, so a short run would
    never see λ change in the forward pass; the offset resolves changes of 1e-4 and finer.
    `log_variance` is the float32 ln λ.

    Modes (`.mode`): "sample" draws fresh ε on every call; "mean" returns v itself (the same
    tensor object, not v + 0·ε, so mean-path logits equal the base model's bit for bit).
    """

    def __init__(self, hidden_size: int, init_variance: float, scale: str = "relative", learnable: bool = True,
                 rms_clip: float | None = None):
        super().__init__()
        if scale not in ("absolute", "relative"):
            raise ValueError(f"scale must be 'absolute' or 'relative', got {scale!r}")
        if not (init_variance > 0 and math.isfinite(init_variance)):
            raise ValueError(f"init_variance must be a positive number, got {init_variance}")
        self.scale = scale
        # relative scale: each token's RMS capped at rms_clip × the median token RMS of its sequence.
        # Attention-sink tokens (BOS in Llama/Qwen/Gemma) carry massive activations, 40-190x the
        # other tokens' RMS in SmolLM2's blocks 11-29 (bench/sink_tokens.py); uncapped they get that
        # much more noise in every feature.
        if rms_clip is not None and not (rms_clip > 0 and math.isfinite(rms_clip)):
            raise ValueError(f"rms_clip must be a positive number, got {rms_clip}")
        self.rms_clip = rms_clip
        self.init_variance = float(init_variance)
        self.base_log_variance = math.log(init_variance)
        self.log_variance_offset = nn.Parameter(torch.zeros(hidden_size), requires_grad=learnable)
        self.mode = "sample"
        # Antithetic pairs: the batch holds two trajectories (dim 0 = [first; second]) and the second
        # gets −ε where the first got ε. The gradient on ln λ is then the NLL's second-order change
        # only: the first-order term, zero in expectation but most of the single-sample variance,
        # cancels within the pair (tests/test_dip_learns.py: the λ the data asks for is reached in
        # a fraction of the steps).
        self.antithetic = False
        # (sum λ, sum ln λ, count) from the last sampling forward, for the prior. Recorded inside
        # forward because ZeRO-3 only gathers a partitioned parameter while its module runs.
        self.prior_terms: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def log_variance(self) -> torch.Tensor:
        """ln λ per feature, float32 (differentiable through the offset)."""
        return self.log_variance_offset.float() + self.base_log_variance

    @property
    def variance(self) -> torch.Tensor:
        return self.log_variance.exp()

    def set_log_variance(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.log_variance_offset.copy_(values.float() - self.base_log_variance)

    def reset_parameters(self) -> None:
        # Called by frameworks that (re)initialise modules after construction (ZeRO-3 Init,
        # transformers' _init_weights): λ must come back to its configured value, never zero.
        with torch.no_grad():
            self.log_variance_offset.zero_()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return v
        log_var = self.log_variance
        if self.log_variance_offset.requires_grad and torch.is_grad_enabled():
            self.prior_terms = (log_var.exp().sum(), log_var.sum(), log_var.numel())
        std = torch.exp(0.5 * log_var).to(v.dtype)
        if self.antithetic:
            if v.shape[0] % 2:
                raise RuntimeError("antithetic DIP noise needs a batch of two trajectories (an even first dimension)")
            eps = torch.randn_like(v[: v.shape[0] // 2])
            noise = torch.cat([eps, -eps]) * std
        else:
            noise = torch.randn_like(v) * std
        if self.scale == "relative":
            rms = v.detach().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # [..., T, 1]
            if self.rms_clip is not None and rms.dim() >= 2 and rms.shape[-2] > 1:
                rms = torch.minimum(rms, rms.median(dim=-2, keepdim=True).values * self.rms_clip)
            noise = noise * rms
        return v + noise

    def extra_repr(self) -> str:
        return (f"hidden={self.log_variance_offset.numel()}, init_variance={self.init_variance:g}, scale={self.scale}, "
                + (f"rms_clip={self.rms_clip:g}, " if self.rms_clip is not None else "") +
                f"learnable={self.log_variance_offset.requires_grad}")


NEFTUNE_ALPHA = 5.0  # the NEFTune paper's and its code's default (axolotl, LLaMA-Factory use it too)
INPUT_NOISE_SIGMA = 0.1


class NEFTuneNoise(nn.Module):
    """NEFTune (Jain et al. 2023): uniform noise U(−1, 1)·α/sqrt(L_i·d) on the token embeddings.

    As the reference implementation (its train.py): L_i is example i's unpadded length, and pad
    positions get no noise; both come from the attention mask the model was called with
    (`attention_mask`, captured by a pre-hook on the model). Without a mask every position
    counts (transformers' own NEFTune hook uses the padded length L for every example)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)
        self.mode = "sample"
        self.attention_mask: torch.Tensor | None = None

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean" or self.alpha == 0:
            return emb
        noise = torch.zeros_like(emb).uniform_(-1, 1)
        mask = self.attention_mask
        if mask is not None and mask.shape == emb.shape[:2]:
            mask = mask.to(emb.dtype)
            noise = noise * mask.unsqueeze(-1)
            lengths = mask.sum(1).clamp_min(1)
        else:
            lengths = torch.full(emb.shape[:1], float(emb.shape[-2]), device=emb.device, dtype=emb.dtype)
        mag = self.alpha / torch.sqrt(lengths * emb.shape[-1])
        return emb + (noise * mag.view(-1, 1, 1)).detach()


@dataclass(frozen=True)
class DipConfig:
    """What `attach_dip` needs; saved as dip/dip_config.json next to the tensors."""

    method: str = "dip"
    placement: str = "block_input"
    scale: str = "relative"
    rms_clip: Optional[float] = None
    init_variance: float = 1e-2
    layers: Optional[list[int]] = None
    noise_scale: float = INPUT_NOISE_SIGMA  # σ of input_noise; α of neftune (NEFTUNE_ALPHA by default)
    # Recorded for readers of the directory; attach_dip does not use them.
    trajectories: int = 1
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_settings(cls, dip) -> "DipConfig":
        alpha, beta, reduction = dip.prior_weights()
        return cls(method=dip.method, placement=dip.placement, scale=dip.scale, rms_clip=dip.rms_clip,
                   init_variance=dip.init_variance,
                   layers=list(dip.layers) if dip.layers is not None else None,
                   noise_scale=default_noise_scale(dip.method, dip.noise_scale),
                   trajectories=dip.trajectories, alpha=alpha, beta=beta, gamma=dip.gamma,
                   extra={"prior_reduction": reduction})


def default_noise_scale(method: str, value: float | None) -> float:
    """dip.noise_scale when set, else the method's own default: NEFTune α = 5, input-noise σ = 0.1."""
    if value is not None:
        return float(value)
    return NEFTUNE_ALPHA if method == "neftune" else INPUT_NOISE_SIGMA


# ----------------------------------------------------------------------------- finding layers

def model_family(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise UsageError(f"unsupported architecture '{mt}' for DIP; supported families: {', '.join(sorted(FAMILIES))}")
    return mt


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer stack of a supported causal LM (also under a peft wrapper)."""
    family = model_family(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    obj = base
    for part in FAMILIES[family][0].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if not isinstance(obj, nn.ModuleList):
        raise UsageError(f"could not find the decoder layers ({FAMILIES[family][0]}) in {type(base).__name__}")
    return obj


def _hidden_size(model) -> int:
    c = model.config
    c = getattr(c, "text_config", None) or c
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(c, attr, None):
            return int(getattr(c, attr))
    raise UsageError(f"cannot tell the hidden size of {type(model).__name__}")


def _replace_first_arg(module: nn.Module, projection: nn.Module):
    """Forward pre-hook that passes the module's hidden-states input through `projection`."""

    def hook(_mod, args, kwargs):
        if getattr(projection, "mode", "sample") == "mean":
            return None  # untouched inputs: the mean path is the base model, bit for bit
        if args:
            return (projection(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": projection(kwargs["hidden_states"])}
        # Passing through would train without noise while reporting DIP: never silently.
        raise RuntimeError(f"DIP projection on {type(_mod).__name__}: the call has no hidden-states input "
                           f"(args: {len(args)}, kwargs: {sorted(kwargs)[:6]})")

    return module.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------- attach

def attach_dip(model: nn.Module, config: DipConfig) -> list[str]:
    """Attach the noise of `config.method` to `model` in place.

    Returns the names of the modules added (empty for method 'none'). Raises UsageError for an
    unsupported family, a bad layer index, or when no block would get a projection.
    """
    if config.method not in METHODS:
        raise UsageError(f"dip.method: expected one of {METHODS}, got {config.method!r}")
    if config.method == "none":
        return []
    if list(iter_noise_modules(model)):
        raise UsageError("this model already has DIP/noise modules attached")
    layers = decoder_layers(model)
    family = model_family(model)
    hidden = _hidden_size(model)
    model._dip_hooks = getattr(model, "_dip_hooks", [])

    if config.method == "neftune":
        emb = model.get_input_embeddings()
        emb.neftune_noise = neft = NEFTuneNoise(config.noise_scale)
        model._dip_hooks.append(emb.register_forward_hook(lambda _m, _a, out: neft(out)))

        def capture_mask(_m, args, kwargs):  # the reference convention needs each example's length
            neft.attention_mask = kwargs.get("attention_mask")

        model._dip_hooks.append(model.register_forward_pre_hook(capture_mask, with_kwargs=True))
        return ["neftune_noise"]

    if config.method == "input_noise":
        # Fixed Gaussian noise on the token embeddings only (block 0's input), σ = noise_scale.
        chosen = [0]
        variance, learnable, placement = config.noise_scale ** 2, False, "block_input"
        if variance <= 0:
            raise UsageError("dip.noise_scale must be > 0 for method input_noise")
    else:
        chosen = list(range(len(layers))) if config.layers is None else list(config.layers)
        # A control's λ are parameters at learning rate 0 (model_setup.build_optimizer): fixed, and
        # carried by checkpoints and export like dip's.
        variance, learnable, placement = config.init_variance, config.method in ("dip",) + CONTROLS, config.placement
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"dip.layers lists a block twice: {chosen}")
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise UsageError(f"dip.layers: block index {bad[0]} out of range (the model has {len(layers)} blocks)")
    if not chosen:
        raise UsageError("dip.layers selects no block: DIP would change nothing")

    names = []
    _, attn_norm, mlp_norm = FAMILIES[family]
    for i in chosen:
        layer = layers[i]
        if placement == "block_input":
            layer.dip_input = DistributionalInputProjection(hidden, variance, config.scale, learnable, config.rms_clip)
            model._dip_hooks.append(_replace_first_arg(layer, layer.dip_input))
            names.append(f"{i}.dip_input")
        else:
            for tag, norm_name in (("dip_attn", attn_norm), ("dip_mlp", mlp_norm)):
                norm = getattr(layer, norm_name, None)
                if norm is None:
                    raise UsageError(f"placement attn_mlp: block {i} of {family} has no '{norm_name}'")
                proj = DistributionalInputProjection(hidden, variance, config.scale, learnable, config.rms_clip)
                setattr(layer, tag, proj)
                model._dip_hooks.append(_replace_first_arg(norm, proj))
                names.append(f"{i}.{tag}")
    return names


def iter_noise_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if isinstance(mod, (DistributionalInputProjection, NEFTuneNoise)):
            yield name, mod


def projections(model: nn.Module) -> list[tuple[str, DistributionalInputProjection]]:
    return [(n, m) for n, m in iter_noise_modules(model) if isinstance(m, DistributionalInputProjection)]


def set_dip_mode(model: nn.Module, mode: str) -> None:
    """'sample' or 'mean' for every noise module. ('average:k' is sampling, averaged by the
    evaluation runner over k trajectories; here it sets sampling.)"""
    if mode != "mean" and mode != "sample" and not mode.startswith("average:"):
        raise ValueError(f"unknown DIP mode {mode!r}")
    for _, m in iter_noise_modules(model):
        m.mode = "mean" if mode == "mean" else "sample"


def is_dip_key(key: str) -> bool:
    return ".dip_input." in key or ".dip_attn." in key or ".dip_mlp." in key or key.startswith(("dip_input.", "dip_attn.", "dip_mlp."))


def lambda_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per projection: mean/min/max λ (for metrics and plots)."""
    out = {}
    for name, p in projections(model):
        lam = p.log_variance.detach().exp()
        if lam.numel() == 0:  # a ZeRO-3 partitioned parameter outside a gather
            continue
        out[_short(name)] = {"mean": lam.mean().item(), "min": lam.min().item(), "max": lam.max().item()}
    return out


def _short(name: str) -> str:
    # "model.layers.3.dip_input" -> "3.dip_input"; the same under peft's prefixes.
    parts = name.split(".")
    return ".".join(parts[-2:])


# ----------------------------------------------------------------------------- objective

PRIOR_REDUCTIONS = ("sum", "mean")


def dip_prior(model: nn.Module, alpha: float, beta: float, reduction: str = "sum") -> torch.Tensor:
    """Σ over every feature of every learnable projection of α·λ − β·ln λ, minus its minimum
    (at λ = β/α, so the term is ≥ 0 and reads as a distance from the prior's optimum).

    `sum` (default) is the ELBO's form: each λ feels α·λ − β on its ln λ whatever the model's
    size. `mean` divides by the N = layers × hidden variances, so each λ's pull shrinks as 1/N
    (bench/dip_prior_gradient.py: 0.2% of the NLL's pull at N = 512, 0.02% at N = 4,096), and α
    and β stop meaning anything at the paper's N ≈ 100k. Uses the terms each projection recorded
    in its last forward (consumed here), the only place a ZeRO-3-partitioned λ is whole; without
    a forward it reads λ directly.
    """
    if reduction not in PRIOR_REDUCTIONS:
        raise ValueError(f"prior reduction must be sum or mean, got {reduction!r}")
    projs = [p for _, p in projections(model) if p.log_variance_offset.requires_grad]
    if not projs or (alpha == 0 and beta == 0):
        for p in projs:
            p.prior_terms = None
        dev = next(model.parameters()).device
        return torch.zeros((), device=dev)
    sum_lam, sum_log, count = 0.0, 0.0, 0
    for p in projs:
        if p.prior_terms is not None:
            sl, slog, n = p.prior_terms
            p.prior_terms = None
        else:
            lv = p.log_variance
            sl, slog, n = lv.exp().sum(), lv.sum(), lv.numel()
        sum_lam, sum_log, count = sum_lam + sl, sum_log + slog, count + n
    at_min = (beta - beta * math.log(beta / alpha)) * count if alpha > 0 and beta > 0 else 0.0
    total = alpha * sum_lam - beta * sum_log - at_min
    return total / count if reduction == "mean" else total


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next target token, and the mask of counted positions.

    logits [N, T, V], labels [N, T] with -100 for ignored positions (HF convention, shifted here).
    """
    target = labels[:, 1:]
    mask = target != -100
    return target_logprobs(logits[:, :-1], target.clamp_min(0)) * mask, mask


def target_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] along the last dimension, in float32."""
    return torch.gather(F.log_softmax(logits.float(), -1), -1, target.unsqueeze(-1)).squeeze(-1)


def dip_objective(logits: torch.Tensor, labels: torch.Tensor, trajectories: int, model: nn.Module,
                  alpha: float, beta: float, gamma: float, prior_reduction: str = "sum") -> dict[str, torch.Tensor]:
    """The DIP loss for a batch that was repeated `trajectories` times along dim 0.

    Returns a dict with `loss` (to backpropagate) and its terms `nll`, `prior`, `var_penalty`.
    NLL is the mean over all counted tokens of all m trajectories; the variance penalty is the
    variance over trajectories of each target token's log-probability, averaged over tokens.
    """
    lp, mask = token_logprobs(logits, labels)
    return objective_terms(lp, mask, trajectories, model, alpha, beta, gamma, prior_reduction)


def objective_terms(lp: torch.Tensor, mask: torch.Tensor, trajectories: int, model: nn.Module,
                    alpha: float, beta: float, gamma: float, prior_reduction: str = "sum",
                    step_tokens: torch.Tensor | None = None, micro_batches: int = 1) -> dict[str, torch.Tensor]:
    """`dip_objective` from the next-token log-probabilities [N, T-1] (0 where not counted) and
    their mask, however they were computed (full logits, or only the counted positions' logits).

    `step_tokens`: the counted tokens of the whole optimizer step (every micro-batch on every
    rank, m trajectories each). The NLL and the variance penalty are then this micro-batch's
    share of the step's token means (`nll`, `var_penalty`: summed over the step's micro-batches
    they are those means), and the loss scales them by `micro_batches` (accumulation × ranks)
    because DeepSpeed averages the micro-batches' gradients. The step's gradient is then that of
    the mean NLL over every counted token of the global batch, however the batch is split: a
    micro-batch weighs what its tokens weigh (the HF Trainer's `num_items_in_batch`). The prior
    is the same in every micro-batch of a step, so the average adds it once per step."""
    m = trajectories
    n_tok = mask.sum().clamp_min(1) if step_tokens is None else step_tokens
    scale = 1 if step_tokens is None else micro_batches
    nll = -lp.sum() / n_tok
    if gamma > 0:
        if m < 2:
            raise ValueError("gamma > 0 needs trajectories >= 2")
        lp_m = lp.view(m, -1, lp.shape[-1])
        var = lp_m.var(dim=0, unbiased=False)  # [B, T]
        mask1 = mask.view(m, -1, mask.shape[-1])[0]
        var_penalty = (var * mask1).sum() / (mask1.sum().clamp_min(1) if step_tokens is None else step_tokens / m)
    else:
        var_penalty = torch.zeros((), device=lp.device)
    prior = dip_prior(model, alpha, beta, prior_reduction).to(lp.device)
    loss = scale * (nll + gamma * var_penalty) + prior
    return {"loss": loss, "nll": nll.detach(), "prior": prior.detach(), "var_penalty": var_penalty.detach()}


def repeat_for_trajectories(batch: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    """The batch stacked m times along dim 0: one forward/backward runs all m trajectories."""
    if m == 1:
        return batch
    return {k: v.repeat(m, *([1] * (v.dim() - 1))) for k, v in batch.items()}


# ----------------------------------------------------------------------------- save / load

def dip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'<block>.<tag>': log-variance [hidden]} for every projection (CPU, contiguous)."""
    return {_short(n): p.log_variance.detach().float().cpu().contiguous() for n, p in projections(model)}


def initial_dip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every projection's λ at its initial value (works on a meta-device model)."""
    return {_short(n): torch.full((p.log_variance_offset.shape[0],), p.base_log_variance)
            for n, p in projections(model)}


def control_state(method: str, source: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A control's ln λ from a dip run's final ln λ (`source`, per projection): `dip_matched` sets
    every feature to ln(mean λ) of its projection, `dip_shuffled` permutes them (seeded)."""
    if method not in CONTROLS:
        raise ValueError(f"not a control method: {method!r}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(source):
        log_var = source[name].float()
        if method == "dip_matched":
            out[name] = torch.full_like(log_var, float(log_var.exp().mean().log()))
        else:
            out[name] = log_var[torch.randperm(log_var.numel(), generator=gen)].contiguous()
    return out


def set_dip_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Set every projection's ln λ from `state` ({'3.dip_input': tensor}); a missing, extra or
    wrong-shaped entry is an error naming it."""
    mods = {_short(n): p for n, p in projections(model)}
    missing, extra = sorted(set(mods) - set(state)), sorted(set(state) - set(mods))
    if missing or extra:
        raise UsageError(f"{where}: projections do not match the model's (missing {missing}, unexpected {extra})")
    for k, mod in mods.items():
        if state[k].shape != mod.log_variance_offset.shape:
            raise UsageError(f"{where}: '{k}' has shape {tuple(state[k].shape)}, expected {tuple(mod.log_variance_offset.shape)}")
        mod.set_log_variance(state[k])


def same_noise(a: DipConfig, b: DipConfig) -> bool:
    """Whether two configs attach the same projections with the same initial λ."""
    keys = ("method", "placement", "scale", "rms_clip", "init_variance", "layers", "noise_scale")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def short_name(param_key: str) -> str:
    """'base_model.model.model.layers.3.dip_input.log_variance_offset' -> '3.dip_input'."""
    return _short(param_key.rsplit(".", 1)[0] if param_key.endswith((".log_variance", ".log_variance_offset"))
                  else param_key)


def save_dip(model: nn.Module | None, config: DipConfig, model_dir: str | Path, state: dict | None = None) -> None:
    """Write dip/dip.safetensors (log-variances) and dip/dip_config.json into `model_dir`."""
    from safetensors.torch import save_file

    d = Path(model_dir) / DIP_SUBDIR
    d.mkdir(parents=True, exist_ok=True)
    state = dip_state(model) if state is None else state
    save_file(state, str(d / DIP_WEIGHTS), metadata={"format": "pt", "content": "log_variance per projection"})
    (d / DIP_CONFIG).write_text(json.dumps({**asdict(config), "projections": sorted(state)}, indent=2))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_dip_config(model_dir: str | Path) -> Optional[DipConfig]:
    """dip/dip_config.json checked field by field (a model directory is untrusted input)."""
    from dipnet.pipeline.readers import read_json_object

    p = Path(model_dir) / DIP_SUBDIR / DIP_CONFIG
    if not p.is_file():
        return None
    return dip_config_from_dict(read_json_object(p), str(p))


def dip_config_from_dict(raw: dict, where: str) -> DipConfig:
    """A DipConfig from untrusted JSON (dip_config.json, a checkpoint's trainer_state.json)."""
    p = where
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object of DIP settings")
    raw = dict(raw)
    raw.pop("projections", None)
    known = set(DipConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"{p}: unknown key '{unknown[0]}'")
    checks = {
        "method": lambda v: v in METHODS, "placement": lambda v: v in ("block_input", "attn_mlp"),
        "scale": lambda v: v in ("absolute", "relative"), "init_variance": lambda v: _finite_number(v) and v > 0,
        "noise_scale": lambda v: _finite_number(v) and v >= 0,
        "rms_clip": lambda v: v is None or (_finite_number(v) and v > 0),
        "layers": lambda v: v is None or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                     and i >= 0 for i in v) and len(set(v)) == len(v)),
        "trajectories": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "alpha": lambda v: _finite_number(v) and v >= 0, "beta": lambda v: _finite_number(v) and v >= 0,
        "gamma": lambda v: _finite_number(v) and v >= 0, "extra": lambda v: isinstance(v, dict),
    }
    for k, v in raw.items():
        if not checks[k](v):
            raise UsageError(f"{p}: '{k}' has an invalid value {v!r}")
    return DipConfig(**raw)


def read_dip_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """dip/dip.safetensors: finite 1-D log-variances (NaN or inf is an error naming the tensor)."""
    wpath = Path(model_dir) / DIP_SUBDIR / DIP_WEIGHTS
    if not wpath.is_file():
        raise UsageError(f"{wpath}: missing (dip_config.json names projections)")
    return read_log_variances(wpath)


def read_log_variances(path: Path) -> dict[str, torch.Tensor]:
    """ln λ per projection from a safetensors file (dip/, a run's lambda.safetensors): finite 1-D
    float tensors, else one line naming the tensor."""
    from safetensors.torch import load_file

    from dipnet.pipeline.models import check_safetensors

    if not Path(path).is_file():
        raise UsageError(f"{path}: missing")
    check_safetensors(path)
    state = load_file(str(path))
    for k, v in state.items():
        if v.dim() != 1 or not v.is_floating_point():
            raise UsageError(f"{path}: '{k}' must be a 1-D float tensor, got shape {tuple(v.shape)} {v.dtype}")
        if not torch.isfinite(v).all():
            raise UsageError(f"{path}: '{k}' holds non-finite log-variances")
    return state


def write_log_variances(path: Path, state: dict[str, torch.Tensor]) -> None:
    """ln λ per projection, written whole or not at all (temporary name, then renamed)."""
    import os

    from safetensors.torch import save_file

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"content": "ln λ per projection"})
    os.replace(tmp, path)


def load_dip(model: nn.Module, model_dir: str | Path) -> list[str]:
    """Reattach the projections saved in `model_dir/dip/` and load their λ exactly.

    A missing, extra or wrong-shaped tensor is an error naming it (no silent loading).
    """
    config = read_dip_config(model_dir)
    if config is None:
        return []
    names = attach_dip(model, config)
    if config.method == "none" or not projections(model):
        return names
    set_dip_state(model, read_dip_state(model_dir), str(Path(model_dir) / DIP_SUBDIR / DIP_WEIGHTS))
    return names


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without DIP tensors: exactly the base architecture's keys."""
    return {k: v for k, v in model.state_dict().items() if not is_dip_key(k)}
