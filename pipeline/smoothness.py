"""`dipnet smoothness MODEL_DIR`: how smooth the loss is with respect to the input embeddings.

The paper's claim is that DIP lowers the Lipschitz constant and a second-order smoothness
measure of the loss w.r.t. the input. Measured on held-out problems (teacher-forced loss of the
reference answer), with DIP in mean mode:
- `grad_norm`: mean ‖∂L/∂e‖ over examples (e: the input embeddings);
- `random_increase` / `adversarial_increase`: loss increase when every token embedding moves by
  ε·RMS(e) in a random direction / along sign(∂L/∂e) (FGSM), ε = `epsilon`;
- `hessian_trace`: Hutchinson estimate of tr(∂²L/∂e²) with Rademacher probes.
Lower is smoother.
"""

from __future__ import annotations

import torch


def _batch(tok, task, limit: int):
    """Prompt + answer + EOS with the prompt masked, exactly as training tokenises GSM8K rows."""
    from dipnet.pipeline.data import collate, tokenize_rows

    examples, _ = tokenize_rows(task.problems[:limit], "gsm8k", tok, 10**6, "truncate", task.name)
    b = collate(examples, tok.pad_token_id)
    return b["input_ids"], b["labels"], b["attention_mask"]


def _loss(model, emb, mask, lab, per_example: bool = False):
    logits = model(inputs_embeds=emb, attention_mask=mask).logits[:, :-1].float()
    tgt = lab[:, 1:]
    m = tgt != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp_min(0), reduction="none") * m
    per = nll.sum(1) / m.sum(1).clamp_min(1)
    return per if per_example else per.mean()


def measure_smoothness(model_dir, task_name: str = "arith-id", limit: int = 64, epsilon: float = 0.05,
                       probes: int = 8, seed: int = 0, synthetic_settings=None, data: str | None = None) -> dict:
    """Smoothness measures on `task_name`'s problems, or on `data` (JSONL with question/answer)."""
    from dipnet.eval.hf_runner import load_hf
    from dipnet.eval.tasks import Task, build_task
    from dipnet.pipeline.readers import read_jsonl

    torch.manual_seed(seed)
    # Eager attention: the CPU SDPA kernels have no double backward (needed for Hessian-vector products).
    model, tok = load_hf(model_dir, dip_mode="mean", attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if data:
        # (tokenisation below names the line of any row without question/answer)
        task, task_name = Task(name=str(data), problems=read_jsonl(data)), str(data)
    else:
        task = build_task(task_name, synthetic_settings=synthetic_settings)
    ids, lab, mask = _batch(tok, task, limit)
    emb0 = model.get_input_embeddings()(ids).detach()
    rms = emb0.pow(2).mean(-1, keepdim=True).sqrt()
    valid = mask.unsqueeze(-1).float()

    emb = emb0.clone().requires_grad_(True)
    per = _loss(model, emb, mask, lab, per_example=True)
    base = per.mean()
    grads = torch.autograd.grad(per.sum(), emb, create_graph=True)[0]
    grad_norm = (grads * valid).flatten(1).norm(dim=1).mean().item()

    with torch.no_grad():
        direction = torch.randn_like(emb0)
        direction = direction / direction.pow(2).mean(-1, keepdim=True).sqrt()
        rand_loss = _loss(model, emb0 + epsilon * rms * direction * valid, mask, lab).item()
        adv_loss = _loss(model, emb0 + epsilon * rms * grads.sign() * valid, mask, lab).item()

    # Hutchinson: tr(H) ≈ mean_v vᵀHv with Rademacher v, H = ∂²(mean loss)/∂e².
    g_mean = grads / len(per)
    traces = []
    for i in range(probes):
        v = (torch.randint(0, 2, emb0.shape, generator=torch.Generator().manual_seed(seed + i)) * 2 - 1).float() * valid
        hv = torch.autograd.grad(g_mean, emb, grad_outputs=v, retain_graph=True)[0]
        traces.append((hv * v).sum().item())
    return {"model_dir": str(model_dir), "task": task_name, "n": len(per), "epsilon": epsilon,
            "loss": base.item(), "grad_norm": grad_norm,
            "random_increase": rand_loss - base.item(), "adversarial_increase": adv_loss - base.item(),
            "hessian_trace": sum(traces) / len(traces), "hessian_probes": probes}
