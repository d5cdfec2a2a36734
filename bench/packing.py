"""Packing: what keeping packed examples apart costs, against packing that lets them see each other
and against no packing at all.

Three ways to feed the same GSM8K-sized examples (synthetic arithmetic problems tokenised by the
tiny base, or GSM8K train with SmolLM2's tokenizer when `--gsm8k`) to one forward + backward:
- `unpacked`: one example per row, right-padded to the longest in the micro-batch;
- `isolated` (data.packing, the default when packing): examples concatenated into rows of
  `--max-length`, position ids restarting per example, no attention mask, so transformers builds a
  block-diagonal causal mask;
- `crossing` (data.packing_cross_document): the same rows, one causal mask over the whole row.
Interleaved round-robin, medians, tokens/s of counted tokens and ratios to `unpacked`, side by side.

    python bench/packing.py                      # the ~25M Llama, 128-token rows, CPU
    python bench/packing.py --device cuda --max-length 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.data import collate, pack, tokenize_rows
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.recipe import TinyBaseSettings
    from dipnet.pipeline.synthetic import generate_split
    from dipnet.pipeline.train import next_token_logprobs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--examples", type=int, default=64, help="examples per timed step")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    base = tiny_base(TinyBaseSettings(), progress=False)
    tok = load_tokenizer(base)
    rows = [dict(r, _line=i + 1) for i, r in enumerate(generate_split(args.examples, 7, ood=False))]
    examples, _ = tokenize_rows(rows, "gsm8k", tok, args.max_length, "truncate", "synthetic")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(device)
    model.config.use_cache = False
    pad = tok.pad_token_id
    micro = max(1, len(examples) // 8)
    feeds = {
        "unpacked": [collate(examples[i:i + micro], pad) for i in range(0, len(examples), micro)],
        "isolated": [collate(pack(examples, args.max_length), pad)],
        "crossing": [collate(pack(examples, args.max_length, cross_document=True), pad)],
    }
    counted = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
    shapes = {k: " + ".join(f"{b['input_ids'].shape[0]}x{b['input_ids'].shape[1]}" for b in v[:2])
              + (" ..." if len(v) > 2 else "") for k, v in feeds.items()}

    def step(batches) -> float:
        t0 = time.perf_counter()
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            lp, mask = next_token_logprobs(model, b)
            (-lp.sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for v in feeds.values():  # warm-up
        step(v)
    times = {k: [] for k in feeds}
    for _ in range(args.rounds):
        for k, v in feeds.items():
            times[k].append(step(v))
    print(f"~25M Llama, {len(examples)} arithmetic examples ({counted} counted tokens), rows of {args.max_length}, "
          f"{args.device}, median of {args.rounds} rounds")
    ref = statistics.median(times["unpacked"])
    print(f"{'feed':10s} {'micro-batches':28s} {'step s':>8s} {'counted tok/s':>14s} {'time vs unpacked':>17s}")
    for k in feeds:
        med = statistics.median(times[k])
        print(f"{k:10s} {shapes[k]:28s} {med:8.3f} {counted / med:14.0f} {med / ref:17.2f}")


if __name__ == "__main__":
    main()
