"""How strongly the DIP prior pulls on each λ, next to the NLL, for `prior_reduction` sum vs mean.

    python bench/dip_prior_gradient.py

For small Llamas with N = layers × hidden learnable variances (N = 512 … 4,096 here; 74k–100k in
the paper's models), one batch of 8 synthetic GSM8K-format problems: the mean over features of
|∂NLL/∂ln λ| and of |∂prior/∂ln λ| at λ = init, for the default α, β. With `mean` the prior's
share falls as 1/N (α and β lose their meaning as models grow); with `sum` it does not depend on N.
"""

from __future__ import annotations

import torch


def measure(hidden: int, layers: int, reduction: str, alpha: float, beta: float, init: float, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dipnet.pipeline import dip, synthetic
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.data import tokenize_rows
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.recipe import TinyBaseSettings

    torch.manual_seed(seed)
    tok = load_tokenizer(tiny_base(TinyBaseSettings(), seed=0, progress=False))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=init, scale="relative"))
    rows = synthetic.generate_split(8, seed, ood=False)
    ex, _ = tokenize_rows([dict(r, _line=i + 1) for i, r in enumerate(rows)], "gsm8k", tok, 96, "truncate", "bench")
    width = max(len(e["input_ids"]) for e in ex)
    ids = torch.full((len(ex), width), tok.pad_token_id or 0)
    lab = torch.full((len(ex), width), -100)
    mask = torch.zeros((len(ex), width), dtype=torch.long)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        ids[i, :n], lab[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    params = [p.log_variance_offset for _, p in dip.projections(model)]
    logits = model(input_ids=ids, attention_mask=mask).logits
    nll = -dip.token_logprobs(logits, lab)[0].sum() / (lab[:, 1:] != -100).sum()
    g_nll = torch.autograd.grad(nll, params, retain_graph=True)
    prior = dip.dip_prior(model, alpha, beta, reduction=reduction)
    g_prior = torch.autograd.grad(prior, params)
    a = torch.cat([g.abs().flatten() for g in g_nll]).mean().item()
    b = torch.cat([g.abs().flatten() for g in g_prior]).mean().item()
    return a, b


def main() -> None:
    from dipnet.pipeline.recipe import DipSettings

    d = DipSettings()
    torch.set_num_threads(2)
    print(f"α={d.alpha:g} β={d.beta:g} init λ={d.init_variance:g}; mean over features of |∂/∂ln λ|\n")
    print("| N (layers × hidden) | reduction | NLL | prior | NLL : prior |")
    print("|---|---|---|---|---|")
    for layers, hidden in ((8, 64), (16, 256)):
        for reduction in ("mean", "sum"):
            a, b = measure(hidden, layers, reduction, d.alpha, d.beta, d.init_variance)
            print(f"| {layers * hidden:,} ({layers} × {hidden}) | {reduction} | {a:.3g} | {b:.3g} | {a / b:,.1f} |")


if __name__ == "__main__":
    main()
