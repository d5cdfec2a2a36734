"""What the noise costs and where the loss is sensitive: diagnostics for learned λ (#24 item 4).

For a model with DIP projections and a few batches of its training data:
- `noise_cost`: ΔNLL = NLL with noise − NLL on the mean path (the nats the noise costs, the
  number the prior strength κ is read against: recipes/README.md "Where λ settles");
- `curvature`: per feature j of each projection, h_j = E[RMS² · ∂²NLL/∂u_j²], estimated from the
  reparameterised gradient: E[∂NLL/∂ln λ_j] = ½·λ_j·h_j (Stein's lemma), with antithetic pairs of
  noise (ε, −ε) so that the first-order term, zero in expectation, cancels in each pair;
- `cross_seed_correlation`: how alike the per-feature ln λ of the same variant are across seeds.

Plain torch on one process (the exported model, not the DeepSpeed engine): a report-time reading.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dipnet.pipeline import dip as dipmod


def training_batches(data_path: str | Path, pad_id: int, n_batches: int, micro: int, seed: int = 0) -> list[dict]:
    """`n_batches` batches of `micro` preprocessed training examples, a fixed random pick."""
    from dipnet.pipeline.data import TokenizedExamples, collate

    examples = TokenizedExamples(Path(data_path))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    picks = [order[(i * micro + j) % len(order)] for i in range(n_batches) for j in range(micro)]
    return [collate([examples[k] for k in picks[i * micro:(i + 1) * micro]], pad_id) for i in range(n_batches)]


def _nll(model, batch: dict) -> torch.Tensor:
    from dipnet.pipeline.data import model_inputs

    logits = model(**model_inputs(batch)).logits
    lp, mask = dipmod.token_logprobs(logits, batch["labels"])
    return -lp.sum() / mask.sum().clamp_min(1)


def noise_cost_and_curvature(model, batches: list[dict], seed: int = 0) -> dict:
    """ΔNLL of the noise at the model's λ, and each projection's curvature estimate h [hidden].

    Returns {'nll_mean', 'nll_noise', 'noise_cost', 'curvature': {name: tensor}}."""
    projs = dipmod.projections(model)
    if not projs:
        raise ValueError("the model has no DIP projections")
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    offsets = [p.log_variance_offset for _, p in projs]
    for o in offsets:
        o.requires_grad_(True)
    for _, p in projs:
        p.antithetic = True
    grads = [torch.zeros_like(o, dtype=torch.float32) for o in offsets]
    nll_mean = nll_noise = 0.0
    torch.manual_seed(seed)
    try:
        model.eval()  # no dropout: the noise is the only randomness measured
        for batch in batches:
            dipmod.set_dip_mode(model, "mean")
            with torch.no_grad():
                nll_mean += _nll(model, batch).item()
            dipmod.set_dip_mode(model, "sample")
            pair = dipmod.repeat_for_trajectories(batch, 2)
            loss = _nll(model, pair)
            nll_noise += loss.item()
            for g, d in zip(grads, torch.autograd.grad(loss, offsets)):
                g += d.float()
    finally:
        dipmod.set_dip_mode(model, "mean")
        for _, p in projs:
            p.antithetic = False
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    k = len(batches)
    curvature = {dipmod._short(n): (2 * g / k / p.variance.detach()).cpu() for (n, p), g in zip(projs, grads)}
    return {"nll_mean": nll_mean / k, "nll_noise": nll_noise / k, "noise_cost": (nll_noise - nll_mean) / k,
            "curvature": curvature}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by position; λ and curvature are continuous)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return pearson(ra, rb)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = math.sqrt(float(a.pow(2).sum() * b.pow(2).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def cross_seed_correlation(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per projection: the mean over pairs of seeds of the Pearson correlation of ln λ across
    features (1: every seed learns the same per-feature structure; 0: none shared). NaN where a
    projection's λ did not vary (a frozen or uniform λ has no structure to share)."""
    seeds = sorted(states)
    names = sorted(set.intersection(*(set(states[s]) for s in seeds))) if seeds else []
    out = {}
    for name in names:
        rs = [pearson(states[a][name], states[b][name]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        rs = [r for r in rs if not math.isnan(r)]
        out[name] = sum(rs) / len(rs) if rs else float("nan")
    return out
