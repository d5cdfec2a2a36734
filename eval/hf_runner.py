"""The `hf` engine: batched greedy generation and teacher-forced scoring with transformers.

One greedy loop (left padding, KV cache, stop strings, EOS) serves three uses:
- plain greedy decoding (DIP in mean mode: the base architecture);
- DIP `average:k`: each prompt runs as k noisy trajectories (own noise, own cache) and every
  step picks the argmax of their averaged next-token probabilities;
- the embedding-noise sweep: Gaussian noise of σ (relative to each token embedding's RMS)
  added to the input embeddings at every forward call.

Output text is decoded as vLLM's detokenizer does: decode(prompt + generated) minus
decode(prompt), so both engines give the same string for the same tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dipnet.eval.extract import truncate_at_stop
from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.errors import UsageError


def fit_prompt(ids: list[int], max_len: int, max_new: int) -> tuple[list[int], bool]:
    """Keep the prompt's last tokens (and its first, BOS) so prompt + generation fits."""
    room = max_len - max_new
    if len(ids) <= room:
        return ids, False
    return [ids[0]] + ids[-(room - 1):], True


@contextlib.contextmanager
def embedding_noise(model, sigma: float, seed: int):
    """Add N(0, (σ·rms)²) to every input embedding while the context is open."""
    if sigma <= 0:
        yield
        return
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()

    def hook(_m, _a, out):
        rms = out.detach().pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        return out + sigma * rms * noise

    h = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def sample_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[str], sampling,
                    batch_size: int = 32) -> list[list[tuple[str, list[int]]]]:
    """`sampling.n` sampled completions per prompt (temperature, top-k, top-p), seeded."""
    flat = greedy_generate(model, tokenizer, [p for p in prompts for _ in range(sampling.n)], max_new_tokens, stops,
                           batch_size=batch_size, sampling=sampling)
    return [flat[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]


def _sample_next(logits: torch.Tensor, sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-k, then to the smallest
    set whose probability reaches top-p (vLLM's and transformers' order)."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = F.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the first token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[str],
                    *, k: int = 1, batch_size: int = 32, seed: int = 0, sampling=None) -> list[tuple[str, list[int]]]:
    """(text, generated ids) per prompt. k > 1 averages k trajectories' probabilities per step;
    `sampling` (eval.sampling.Sampling): sample instead of taking the argmax."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling is not None else None
    results: list[tuple[str, list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.repeat_interleave(k, 0).to(device), mask.repeat_interleave(k, 0).to(device)
        generated = [[] for _ in chunk]
        done = [False] * len(chunk)
        past = None
        cur = ids
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -cur.shape[1]:]
            # logits_to_keep=1: the prefill would otherwise build [batch, prompt, vocab] logits
            # (4 GB for 20 five-shot GSM8K prompts and a 49k vocabulary) to use the last row.
            out = model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                        logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            if k > 1:
                probs = F.softmax(logits, -1).view(len(chunk), k, -1).mean(1)
                nxt = probs.argmax(-1)
            elif sampling is not None:
                nxt = _sample_next(logits, sampling, generator)
            else:
                nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                generated[i].append(t)
                if len(generated[i]) % 4 == 0 and _hits_stop(tokenizer, chunk[i], generated[i], stops):
                    done[i] = True
            if all(done):
                break
            nxt = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad), nxt)
            cur = nxt.repeat_interleave(k, 0).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones_like(cur)], -1)
        for p, g in zip(chunk, generated):
            results.append((truncate_at_stop(decode_continuation(tokenizer, p, g), stops), g))
    return results


def decode_continuation(tokenizer, prompt: list[int], gen: list[int]) -> str:
    # Special tokens kept, as lm-eval's vLLM backend asks of vLLM (skip_special_tokens=False):
    # a stop string such as <|im_end|> must be seen to cut there.
    full = tokenizer.decode(prompt + gen, skip_special_tokens=False, spaces_between_special_tokens=False)
    head = tokenizer.decode(prompt, skip_special_tokens=False, spaces_between_special_tokens=False)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(gen, skip_special_tokens=False)


def _hits_stop(tokenizer, prompt, gen, stops) -> bool:
    text = decode_continuation(tokenizer, prompt, gen)
    return any(s in text for s in stops)


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: list[list[int]], answers: list[list[int]], max_len: int,
                   batch_size: int = 16) -> list[dict]:
    """Per problem: mean NLL of the reference answer tokens and their greedy token accuracy.

    Rows are left-padded so every answer ends at the last position, and only the answer
    positions' logits are computed (`logits_to_keep`): a 900-token prompt costs its forward pass,
    not a [900, vocab] float32 matrix. Rows are batched in order of length (results in the
    callers' order): padding a 160-token GSM8K prompt to a 440-token batchmate costs as much as
    the prompt itself.
    """
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for p, a_ids in zip(prompts, answers):
        ids = (p + a_ids)[-max_len:]
        n_a = min(len(a_ids), len(ids) - 1)
        rows.append((ids, n_a))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[dict | None] = [None] * len(rows)
    for start in range(0, len(rows), batch_size):
        where = order[start:start + batch_size]
        chunk = [rows[i] for i in where]
        width = max(len(r[0]) for r in chunk)
        keep = max(n for _, n in chunk) + 1
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (r, _) in enumerate(chunk):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       logits_to_keep=keep).logits.float().cpu()  # [B, keep, V]: the last `keep` positions
        logp = F.log_softmax(logits, -1)
        for i, (r, n_a) in enumerate(chunk):
            tgt = torch.tensor(r[len(r) - n_a:])
            lp = logp[i, keep - n_a - 1:keep - 1]  # position t predicts token t+1
            nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            acc = (lp.argmax(-1) == tgt).float()
            out[where[i]] = {"nll": nll.mean().item(), "token_acc": acc.mean().item(), "answer_tokens": n_a}
    return out


GQA_SDPA = "dipnet_sdpa_gqa"


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' SDPA attention, with grouped KV heads handed to SDPA as they are (`enable_gqa`).

    With a padding mask, transformers' SDPA path copies every KV head to each query head it serves
    before attending (its fused kernels on CUDA refuse masked GQA); on the CPU that copy costs about
    a quarter of a batched greedy generation of SmolLM2 (3 KV heads for 9 query heads), and SDPA's
    own GQA gives the same numbers (bench/eval_throughput.py). Anything unusual goes to transformers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    plain = (query.shape[1] == key.shape[1] or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
             or kwargs.get("output_attentions") or (causal and kv_len != q_len))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model) -> bool:
    """Switch a model that attends with SDPA and shares KV heads to `sdpa_gqa_attention` (on the
    CPU only: CUDA's fused kernels need transformers' own path). Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if next(model.parameters()).device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    if not any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules()):
        return False
    AttentionInterface.register(GQA_SDPA, sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    model.set_attn_implementation(GQA_SDPA)
    return True


def load_hf(model_dir, dip_mode: str = "mean", trust_remote_code: bool = False, attn_implementation: str | None = None,
            dtype: str = "float32"):
    from dipnet.pipeline.models import load_causal_lm, load_tokenizer, read_adapter

    adapter = read_adapter(model_dir, trust_remote_code)
    if adapter and dip_mode != "mean":
        raise UsageError(f"{model_dir}: a LoRA adapter is evaluated on its mean path; DIP sampling needs a merged "
                         "export (export.merge_lora: true)")
    model = load_causal_lm(adapter.base if adapter else model_dir, trust_remote_code=trust_remote_code, with_dip=True,
                           attn_implementation=attn_implementation, dtype=getattr(torch, dtype))
    if adapter:  # peft's loader, then merged: the mean path runs at the base model's speed
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter.dir)).merge_and_unload()
    if attn_implementation is None:
        use_gqa_sdpa(model)
    dipmod.set_dip_mode(model, dip_mode)
    return model, load_tokenizer(model_dir, trust_remote_code)
