"""Massive activations and DIP's relative scale (#24 item 7): the RMS of each decoder block's input
at the first token (BOS / the attention sink) against the other tokens, on real pretrained models.

`scale: relative` multiplies each token's noise by that token's RMS, so a token whose activations
are 100x the others' gets 100x the noise in every feature. This prints, per block input, the
first token's RMS, the median of the others', and their ratio, then what each remedy would do to
the first token's noise. Models come from the package registry (GGUF, pipeline/pretrained.py).

    python bench/sink_tokens.py [--models smollm2-135m-instruct gemma3-270m]
"""

import argparse
import statistics

import torch

from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.models import load_causal_lm, load_tokenizer
from dipnet.pipeline.pretrained import pretrained_base

PROMPTS = ["Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?\nAnswer:",
           "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
           "How much did she earn?\nAnswer:",
           "The capital of France is Paris, and the capital of Italy is"]


def block_input_rms(model, tokenizer) -> list[list[tuple[float, float]]]:
    """Per prompt, per block: (RMS at position 0, median RMS over positions 1..)."""
    layers = dipmod.decoder_layers(model)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if tokenizer.bos_token_id is not None and ids[0, 0] != tokenizer.bos_token_id:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1)
        seen = []
        hooks = [layer.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"])[0].pow(2).mean(-1).sqrt()),
            with_kwargs=True) for layer in layers]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        rows.append([(float(r[0]), statistics.median(r[1:].tolist())) for r in seen])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    args = ap.parse_args()
    for spec in args.models:
        path = pretrained_base(spec, progress=False)
        model, tok = load_causal_lm(path, with_dip=False, dtype=torch.float32), load_tokenizer(path)
        rows = block_input_rms(model, tok)
        n = len(rows[0])
        print(f"\n{spec}: {n} blocks; block-input RMS at the first token vs the median of the others "
              f"(mean over {len(PROMPTS)} prompts)")
        print("block | first token | others (median) | ratio")
        ratios = []
        for b in range(n):
            first = statistics.mean(r[b][0] for r in rows)
            other = statistics.mean(r[b][1] for r in rows)
            ratios.append(first / other)
            if b < 3 or b >= n - 2 or b % max(1, n // 6) == 0:
                print(f"{b:5d} | {first:11.2f} | {other:15.3f} | {first / other:6.1f}x")
        print(f"ratio over blocks: median {statistics.median(ratios):.1f}x, max {max(ratios):.1f}x "
              f"(blocks above 10x: {sum(r > 10 for r in ratios)} of {n})")


if __name__ == "__main__":
    main()
