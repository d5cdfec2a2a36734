"""Does λ learn from the data? (#24 item 1)

A DIP projection in front of a frozen linear classifier whose loss depends sharply on 128 of its
1,024 input features and hardly on the rest. The loss's curvature in each feature is known exactly
(softmax cross-entropy: h_j = Σ_c W_cj² p_c − (Σ_c W_cj p_c)², times the relative scale's RMS²),
so the equilibrium of NLL + prior has a closed form: with the prior κ·mean_j(λ_j/λp − ln λ_j/λp − 1)
and NLL(λ) ≈ NLL(0) + ½·Σ_j h_j·λ_j,
    λ_j* = λp / (1 + λp·N·h_j / (2κ))    (N features),
and training with the recipe's own optimizer groups (λ at train.lr × dip.lr_scale) and objective
must reach it: sensitive features end well below the others, each group near its prediction.
"""

import torch
import torch.nn.functional as F

from dipnet.pipeline import dip
from dipnet.pipeline.model_setup import build_optimizer
from dipnet.pipeline.recipe import apply_overrides, read_yaml, validate_dict

CLASSES, N, SENSITIVE, LAMBDA_P, KAPPA = 16, 1024, 128, 1e-2, 0.02


class FrozenReadout(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, init_variance: float, learnable: bool = True):
        super().__init__()
        self.proj = dip.DistributionalInputProjection(weight.shape[1], init_variance, "relative", learnable)
        self.register_buffer("weight", weight)

    def forward(self, x):
        return self.proj(x) @ self.weight.T


def readout() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(CLASSES, N, generator=gen) * 0.02
    w[:, :SENSITIVE] = torch.randn(CLASSES, SENSITIVE, generator=gen) * 0.25
    return w


def curvature(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E over examples of RMS(x)²·∂²NLL/∂u_j² at u = x (the Hessian's diagonal, exactly)."""
    p = (x @ w.T).softmax(-1)                                   # [B, C]
    diag = p @ w.pow(2) - (p @ w).pow(2)                        # [B, N]
    return (diag * x.pow(2).mean(-1, keepdim=True)).mean(0)


def tiny_recipe(overrides: list[str]):
    """recipes/tiny-arith.yaml with the κ/λp prior in place of its α, β."""
    raw = read_yaml("recipes/tiny-arith.yaml")
    for key in ("alpha", "beta", "prior_reduction"):
        raw["dip"].pop(key, None)
    base = [f"dip.prior_strength={KAPPA}", f"dip.prior_variance={LAMBDA_P}", f"dip.init_variance={LAMBDA_P}"]
    return validate_dict(apply_overrides(raw, base + overrides), "recipes/tiny-arith.yaml")


def train_lambda(w, recipe, steps: int = 400, examples: int = 64) -> torch.Tensor:
    """λ after `steps` optimizer steps on the recipe's objective, `examples` noisy inputs per step
    (m trajectories of examples/m inputs each, as training repeats a batch)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    d = recipe.dip
    model = FrozenReadout(w, d.init_variance, learnable=d.method == "dip")
    model.proj.antithetic = d.antithetic
    optimizer = build_optimizer(model, recipe)
    alpha, beta, reduction = d.prior_weights()
    for _ in range(steps):
        x = torch.randn(examples // d.trajectories, N, generator=gen).repeat(d.trajectories, 1)
        lp = -F.cross_entropy(model(x), (x @ w.T).argmax(-1), reduction="none")[:, None]
        terms = dip.objective_terms(lp, torch.ones_like(lp, dtype=torch.bool), d.trajectories, model,
                                    alpha, beta, 0.0, reduction)
        optimizer.zero_grad()
        if terms["loss"].requires_grad:  # frozen λ: nothing to train
            terms["loss"].backward()
        optimizer.step()
    return model.proj.variance.detach()


def test_learned_lambda_settles_where_the_data_and_prior_balance():
    w = readout()
    h = curvature(w, torch.randn(8192, N, generator=torch.Generator().manual_seed(2)))
    predicted = LAMBDA_P / (1 + LAMBDA_P * N * h / (2 * KAPPA))
    sens, rest = slice(0, SENSITIVE), slice(SENSITIVE, N)
    off = lambda lam, g: lam[g].mean().item() / predicted[g].mean().item()  # noqa: E731

    lam = train_lambda(w, tiny_recipe(["dip.trajectories=2", "dip.antithetic=true", "train.lr=1e-3", "dip.lr_scale=30"]))
    # Margin: the sensitive features end below a third of the others' λ (predicted: ~0.12).
    assert lam[sens].mean() < lam[rest].mean() / 3, (lam[sens].mean(), lam[rest].mean())
    assert 0.8 < off(lam, sens) < 1.25 and 0.8 < off(lam, rest) < 1.25, (off(lam, sens), off(lam, rest))
    # Per feature too: within the sensitive group λ follows the curvature's order.
    rank = lambda t: t.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(lam[sens]), rank(predicted[sens])]))[0, 1] > 0.5

    # Independent noise in each trajectory, same examples, steps and learning rate: the gradient
    # on ln λ keeps its first-order term and λ is still far above where the data puts it.
    plain = train_lambda(w, tiny_recipe(["dip.trajectories=2", "train.lr=1e-3", "dip.lr_scale=30"]))
    assert off(plain, sens) > 1.3 * off(lam, sens), (off(plain, sens), off(lam, sens))

    # Frozen λ (dip_fixed): nothing moves.
    fixed = train_lambda(w, tiny_recipe(["dip.method=dip_fixed", "train.lr=1e-3"]), steps=5)
    assert torch.equal(fixed, torch.full((N,), LAMBDA_P))


def test_noise_cost_agrees_with_the_curvature_estimate(exported):
    """The report's diagnostics on a trained model: the curvature estimated from λ's gradient
    predicts the NLL the noise costs (ΔNLL ≈ ½·Σ λ_j·h_j, second order), at two noise levels."""
    import math

    from dipnet.pipeline.dip_diagnostics import noise_cost_and_curvature
    from dipnet.pipeline.models import load_causal_lm

    from dipnet.pipeline.dip_diagnostics import training_batches
    from dipnet.pipeline.models import load_tokenizer

    model = load_causal_lm(exported)
    data = next((exported.parent / "_preprocessed").glob("*/examples.safetensors"))  # what it was trained on
    batches = training_batches(data, load_tokenizer(exported).pad_token_id, n_batches=4, micro=8)
    costs = []
    for lam in (3e-3, 3e-2):
        for _, p in dip.projections(model):
            p.set_log_variance(torch.full_like(p.log_variance_offset, math.log(lam)))
        res = noise_cost_and_curvature(model, batches)
        predicted = 0.5 * sum(lam * h.sum().item() for h in res["curvature"].values())
        assert res["noise_cost"] > 0 and 0.7 < predicted / res["noise_cost"] < 1.4, (lam, predicted, res["noise_cost"])
        costs.append(res["noise_cost"])
    assert 5 < costs[1] / costs[0] < 20  # ten times the variance, about ten times the cost


def test_cross_seed_correlation():
    from dipnet.pipeline.dip_diagnostics import cross_seed_correlation

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(64, generator=gen)
    same = {s: {"0.dip_input": shared + 0.1 * torch.randn(64, generator=gen)} for s in range(3)}
    unrelated = {s: {"0.dip_input": torch.randn(64, generator=gen)} for s in range(3)}
    assert cross_seed_correlation(same)["0.dip_input"] > 0.95
    assert abs(cross_seed_correlation(unrelated)["0.dip_input"]) < 0.3
    uniform = {s: {"0.dip_input": torch.zeros(64)} for s in range(2)}
    assert cross_seed_correlation(uniform)["0.dip_input"] != cross_seed_correlation(uniform)["0.dip_input"]  # NaN
