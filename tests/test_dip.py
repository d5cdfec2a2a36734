"""DIP layers: per-family conversion exactness, sampling statistics, gradients, the objective,
the baselines, and the dip/ save/load round trip."""

import math

import pytest
import torch
from conftest import FAMILIES, family_configs

from dipnet.pipeline import dip
from dipnet.pipeline.convert import convert
from dipnet.pipeline.models import load_causal_lm
from dipnet.pipeline.errors import UsageError


def _model(family, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_configs()[family]).eval()


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("placement", ["block_input", "attn_mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mean_path_is_base_model_bit_for_bit(family, placement):
    model = _model(family)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=x).logits
        names = dip.attach_dip(model, dip.DipConfig(method="dip", placement=placement, init_variance=0.05))
        n_layers = len(dip.decoder_layers(model))
        assert len(names) == n_layers * (1 if placement == "block_input" else 2)
        dip.set_dip_mode(model, "mean")
        assert torch.equal(model(input_ids=x).logits, base)
        dip.set_dip_mode(model, "sample")
        noisy = model(input_ids=x).logits
    assert not torch.equal(noisy, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_lambda(family):
    model = _model(family).train()
    dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=0.05))
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=x, labels=x)
    terms = dip.dip_objective(out.logits, x, 1, model, alpha=1.0, beta=0.01, gamma=0.0)
    terms["loss"].backward()
    projs = dip.projections(model)
    assert projs
    for name, p in projs:
        assert p.log_variance_offset.grad is not None, name
        assert p.log_variance_offset.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_round_trip(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = _save(_model(family), tmp_path / "src")
    out = tmp_path / "dip"
    summary = convert(src, out, dip.DipConfig(method="dip", init_variance=0.02))
    assert summary["projections"] == 2 and summary["family"] == family
    assert (out / "dip" / "dip.safetensors").is_file() and (out / "dip" / "dip_config.json").is_file()
    assert not any(p.name.startswith("dip") for p in out.glob("*.safetensors"))  # out of vLLM's sight
    # Reloading reattaches the projections with their λ.
    reloaded = load_causal_lm(out)
    projs = dip.projections(reloaded)
    assert len(projs) == 2
    for _, p in projs:
        assert torch.allclose(p.variance, torch.full_like(p.variance, 0.02))
    # Plain transformers gives the base model, and its logits equal the mean path.
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not dip.projections(plain)
    x = torch.randint(3, 128, (1, 9))
    dip.set_dip_mode(reloaded, "mean")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, reloaded.eval()(input_ids=x).logits)


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_sample_variance_matches_lambda(scale):
    torch.manual_seed(0)
    hidden = 16
    proj = dip.DistributionalInputProjection(hidden, 0.04, scale=scale)
    with torch.no_grad():
        proj.set_log_variance(torch.linspace(math.log(0.01), math.log(0.25), hidden))
    v = torch.randn(4000, hidden) * 3.0
    u = proj(v)
    diff = u - v
    if scale == "relative":
        diff = diff / v.pow(2).mean(-1, keepdim=True).sqrt()
    emp = diff.var(0)
    # Sampling tolerance: the variance of a sample variance is 2σ⁴/n; allow 5 standard errors.
    tol = 5 * proj.variance.detach() * math.sqrt(2 / 4000)
    assert torch.all((emp - proj.variance.detach()).abs() < tol)


def test_rms_clip_caps_the_noise_of_massive_activation_tokens(tmp_path):
    """An attention-sink token 100x the others' RMS: uncapped, its noise is 100x theirs; with
    rms_clip 2 it is capped at 2x its sequence's median token RMS, and the other tokens' noise
    does not change."""
    torch.manual_seed(0)
    v = torch.randn(64, 32, 256)
    v[:, 0] *= 100.0
    noise_std = {}
    for clip in (None, 2.0):
        proj = dip.DistributionalInputProjection(256, 0.01, "relative", rms_clip=clip)
        torch.manual_seed(1)
        d = proj(v) - v
        noise_std[clip] = (d[:, 0].std().item(), d[:, 1:].std().item())
    median_rms = v[:, 1:].pow(2).mean(-1).sqrt().median().item()
    assert noise_std[None][0] == pytest.approx(100 * noise_std[None][1], rel=0.05)
    assert noise_std[2.0][0] == pytest.approx(2 * 0.1 * median_rms, rel=0.05)
    assert noise_std[2.0][1] == pytest.approx(noise_std[None][1], rel=1e-6)
    with pytest.raises(ValueError, match="rms_clip must be a positive number"):
        dip.DistributionalInputProjection(8, 0.01, rms_clip=0.0)
    # It travels with the model (dip/dip_config.json), so sampled evaluation applies it too.
    dip.save_dip(None, dip.DipConfig(rms_clip=2.0), tmp_path, state={"0.dip_input": torch.zeros(4)})
    assert dip.read_dip_config(tmp_path).rms_clip == 2.0


def test_mean_mode_returns_same_tensor():
    proj = dip.DistributionalInputProjection(8, 0.1)
    proj.mode = "mean"
    v = torch.randn(2, 8)
    assert proj(v) is v


def test_prior_alone_reaches_beta_over_alpha():
    model = _model("llama")
    dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=0.3))
    alpha, beta = 2.0, 0.02
    params = [p.log_variance_offset for _, p in dip.projections(model)]
    # Short-memory Adam with a stepped learning rate: the gradients shrink near the optimum.
    opt = torch.optim.Adam(params, lr=0.05, betas=(0.5, 0.5))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [200, 400], 0.1)
    for _ in range(600):
        opt.zero_grad()
        dip.dip_prior(model, alpha, beta).backward()
        opt.step()
        sched.step()
    for _, proj in dip.projections(model):
        lam = proj.variance.detach()
        assert torch.allclose(lam, torch.full_like(lam, beta / alpha), rtol=1e-3)


def test_objective_terms_match_hand_computed():
    model = _model("llama")
    dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=0.01))
    with torch.no_grad():
        for i, (_, p) in enumerate(dip.projections(model)):
            p.set_log_variance(torch.full_like(p.log_variance, math.log(0.01 * (i + 1))))  # λ = 0.01 and 0.02
    # m = 2 trajectories of a batch of 1, T = 3, V = 2; labels ignore position 1's target.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]],
                           [[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0], [-100, 1, 0]])
    alpha, beta, gamma = 0.5, 0.1, 0.3
    t = dip.dip_objective(logits, labels, 2, model, alpha, beta, gamma)
    # targets: row0 pos0->1 (logits 0,0): ln 0.5; pos1->0 (1,0): ln(e/(e+1)).
    #          row1 pos0->1 (0,2): ln(e²/(1+e²)); pos1->0 (1,0): ln(e/(e+1)).
    a, b, c = math.log(0.5), math.log(math.e / (math.e + 1)), math.log(math.e ** 2 / (1 + math.e ** 2))
    nll = -(a + b + c + b) / 4
    var = ((a - c) / 2) ** 2 / 2  # per-token population variance over 2 trajectories, averaged over 2 tokens
    n = sum(p.log_variance.numel() for _, p in dip.projections(model))
    at_min = beta - beta * math.log(beta / alpha)  # α·λ − β·ln λ at λ = β/α
    h = n // 2  # half the features at λ = 0.01, half at 0.02
    prior = h * (alpha * 0.01 - beta * math.log(0.01)) + h * (alpha * 0.02 - beta * math.log(0.02)) - n * at_min
    assert dip.dip_prior(model, alpha, beta, "mean").item() == pytest.approx(prior / n, rel=1e-5)
    t = dip.dip_objective(logits, labels, 2, model, alpha, beta, gamma)
    assert t["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert t["var_penalty"].item() == pytest.approx(var, rel=1e-5)
    assert t["prior"].item() == pytest.approx(prior, rel=1e-5) and t["prior"].item() > 0
    assert t["loss"].item() == pytest.approx(nll + prior + gamma * var, rel=1e-6)


def test_trajectories_are_one_batch():
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.arange(6).view(2, 3)}
    rep = dip.repeat_for_trajectories(batch, 3)
    assert rep["input_ids"].shape == (6, 3)
    assert torch.equal(rep["input_ids"][2:4], batch["input_ids"])


def test_baselines_attach_as_specified():
    m = _model("llama")
    dip.attach_dip(m, dip.DipConfig(method="input_noise", noise_scale=0.2))
    (name, p), = dip.projections(m)
    assert name.endswith("layers.0.dip_input") and not p.log_variance_offset.requires_grad
    assert torch.allclose(p.variance, torch.full_like(p.variance, 0.04))

    m = _model("llama")
    dip.attach_dip(m, dip.DipConfig(method="dip_fixed", init_variance=0.01))
    assert all(not p.log_variance_offset.requires_grad for _, p in dip.projections(m))
    assert dip.dip_prior(m, 1.0, 1.0).item() == 0.0  # nothing learnable: no prior

    m = _model("llama")
    assert dip.attach_dip(m, dip.DipConfig(method="none")) == []

    m = _model("llama")
    dip.attach_dip(m, dip.DipConfig(method="neftune", noise_scale=5.0))
    emb = m.get_input_embeddings()
    x = torch.randint(3, 128, (2, 10))
    clean = torch.nn.functional.embedding(x, emb.weight)
    noisy = emb(x)
    bound = 5.0 / math.sqrt(10 * 64)
    assert 0 < (noisy - clean).abs().max() <= bound
    dip.set_dip_mode(m, "mean")
    assert torch.equal(emb(x), clean)


def test_neftune_follows_the_reference_length_and_padding_convention():
    """α/sqrt(L_i·d) with L_i each example's unpadded length, and no noise on pad positions."""
    from dipnet.pipeline.recipe import DipSettings

    assert dip.DipConfig.from_settings(DipSettings(method="neftune")).noise_scale == 5.0
    assert dip.DipConfig.from_settings(DipSettings(method="input_noise")).noise_scale == 0.1
    m = _model("llama")
    dip.attach_dip(m, dip.DipConfig(method="neftune", noise_scale=5.0))
    emb = m.get_input_embeddings()
    seen = []
    h = emb.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    x = torch.randint(3, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 4:] = 0  # example 1: 4 real tokens, 6 pads
    m(input_ids=x, attention_mask=mask)
    h.remove()
    delta = seen[0] - torch.nn.functional.embedding(x, emb.weight)
    d = delta.shape[-1]
    assert delta[1, 4:].abs().max() == 0  # pads clean
    assert 0.8 * 5 / math.sqrt(10 * d) < delta[0].abs().max() <= 5 / math.sqrt(10 * d) + 1e-7
    assert 5 / math.sqrt(10 * d) < delta[1, :4].abs().max() <= 5 / math.sqrt(4 * d) + 1e-7


def test_layers_restrict_and_errors():
    m = _model("llama")
    assert dip.attach_dip(m, dip.DipConfig(method="dip", layers=[1])) == ["1.dip_input"]
    with pytest.raises(UsageError, match="out of range"):
        dip.attach_dip(_model("llama"), dip.DipConfig(method="dip", layers=[5]))
    with pytest.raises(UsageError, match="selects no block"):
        dip.attach_dip(_model("llama"), dip.DipConfig(method="dip", layers=[]))


def test_unsupported_architecture_lists_families():
    import transformers as T

    cfg = T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UsageError) as e:
        dip.attach_dip(model, dip.DipConfig())
    assert "unsupported architecture 'bloom'" in str(e.value) and "llama" in str(e.value) and "gpt2" in str(e.value)


def test_lora_trains_lambda_with_adapters():
    from peft import LoraConfig, get_peft_model

    m = _model("llama")
    dip.attach_dip(m, dip.DipConfig(method="dip"))
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # peft freezes everything but the adapters; DIP re-enables λ (see train.setup_model).
    from dipnet.pipeline.model_setup import unfreeze_lambda

    unfreeze_lambda(pm, "dip")
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert sum("log_variance" in n for n in trainable) == 2
    assert all("lora_" in n or "log_variance" in n for n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_counted_position_logits_equal_full_logits(family):
    """Training computes logits only at counted positions where a model allows it: same
    log-probabilities and gradients as full logits (same DIP noise), and families whose logits
    are post-processed after the output layer (Gemma 2's soft-capping) keep the full path."""
    from dipnet.pipeline.train import counted_logits_are_exact, next_token_logprobs

    model = _model(family).train()
    dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=0.05))
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = x.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    batch = {"input_ids": x, "attention_mask": (labels != -100) | (torch.arange(12) < 9), "labels": labels}
    exact = counted_logits_are_exact(model, model, batch, world=1)
    assert exact == (family != "gemma2"), family
    if not exact:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for layer in (None, model.get_output_embeddings()):
        torch.manual_seed(7)  # the same noise for both paths
        lp, mask = next_token_logprobs(model, batch, layer)
        results.append((lp, mask, torch.autograd.grad(-lp.sum(), params, allow_unused=True)))
    (lp_full, mask_full, g_full), (lp_sel, mask_sel, g_sel) = results
    assert torch.equal(mask_full, mask_sel) and mask_sel.sum() == 11 + 8 - 4
    assert torch.allclose(lp_full, lp_sel, atol=1e-5), (lp_full - lp_sel).abs().max()
    assert (lp_sel[~mask_sel] == 0).all()
    for a, b in zip(g_full, g_sel):
        if a is None:
            assert b is None or not b.any()
        else:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
