"""Generated tokens/s: vLLM vs transformers batched `generate` vs one prompt at a time.

256 prompts x 64 new tokens (EOS ignored, so every engine generates the same count), greedy, on
the tiny base, a ~25M-parameter Llama (hidden 512, 8 layers, head dim 64; random weights:
throughput does not depend on them) and SmolLM2-135M-Instruct (the real model, on GSM8K test
questions in lm-eval's zero-shot `Question: ...\nAnswer:` form when ../shared/data/gsm8k is
present). All engines run in this process, one after another, and the ratios are printed side
by side. For each model and dtype (`--dtype`; transformers runs in the same one), vLLM runs once per
KV-cache size in `--kv-gib` (VLLM_CPU_KVCACHE_SPACE; default: what dipnet's engine picks).

    python bench/eval_throughput.py [--models tiny,25m,smollm2] [--dtype float32,bfloat16] [--kv-gib 1,4] [--compiled]

`--single N` times one-prompt-at-a-time generation on the first N prompts (it is slow) and
reports its tokens/s. `--compiled` lets vLLM compile (CPU: slower start, faster steps).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_25m(tmp: Path, tok_dir: Path, max_position: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dipnet.pipeline.models import copy_tokenizer_files

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_position,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    d = tmp / "llama25m"
    LlamaForCausalLM(cfg).save_pretrained(d)
    copy_tokenizer_files(tok_dir, d)
    return d


def prompts_for(tok, n: int, gsm8k: bool = False) -> list[list[int]]:
    from dipnet.eval.tasks import build_task, default_gsm8k_dir

    if gsm8k and default_gsm8k_dir() is not None:
        task = build_task("gsm8k", shots=0, gsm8k_path=str(default_gsm8k_dir()))
    else:
        task = build_task("arith-id")
    return [tok(task.prompt(i % len(task.problems))).input_ids for i in range(n)]


def hf_batched(model, prompts, new, batch, pad=3):
    n_tok = 0
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        w = max(map(len, chunk))
        ids = torch.tensor([[pad] * (w - len(p)) + p for p in chunk])
        mask = (torch.arange(w)[None, :] >= torch.tensor([w - len(p) for p in chunk])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        n_tok += (out.shape[1] - w) * len(chunk)
    return n_tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,25m,smollm2")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--single", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="hf batched generate batch size")
    ap.add_argument("--kv-gib", default="default", help="comma list of VLLM_CPU_KVCACHE_SPACE values to try "
                    "('default': what dipnet's engine uses)")
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma list; transformers runs in the same dtype")
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dipnet.eval.vllm_runner import default_kv_cache_gib, vllm_environment
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.recipe import TinyBaseSettings

    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    os.environ.update(vllm_environment(tmp / "vllm"))
    tempfile.tempdir = None
    tiny = tiny_base(TinyBaseSettings(), progress=False)
    builders = {"tiny": lambda: ("tiny (1M)", tiny), "25m": lambda: ("llama 25M", make_25m(tmp, tiny)),
                "smollm2": lambda: ("SmolLM2-135M", _smollm2())}
    print(f"{args.prompts} prompts x {args.new} new tokens, greedy, EOS ignored; torch threads {torch.get_num_threads()}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    for key in args.models.split(","):
        name, d = builders[key]()
        tok = AutoTokenizer.from_pretrained(d)
        prompts = prompts_for(tok, args.prompts, gsm8k=key == "smollm2")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        single = args.single if key != "smollm2" else min(args.single, 8)
        print(f"\n{name}: vLLM {'compiled' if args.compiled else 'eager'}; prompts {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} tokens")
        print(f"{'engine':40s} {'tokens/s':>10s} {'best vLLM ÷ this':>17s}")
        for dtype in args.dtype.split(","):
            model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
            hf_batched(model, prompts[:2], 4, 2, pad)  # warm-up
            t0 = time.perf_counter()
            n = hf_batched(model, prompts, args.new, args.batch, pad)
            hf_b = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = hf_batched(model, prompts[:single], args.new, 1, pad)
            hf_1 = n / (time.perf_counter() - t0)
            del model

            rows = []
            for kv in args.kv_gib.split(","):
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(default_kv_cache_gib()) if kv == "default" else kv
                t0 = time.perf_counter()
                kw = dict(model=str(d), dtype=dtype, max_model_len=max(map(len, prompts)) + args.new, seed=0,
                          max_num_seqs=256)
                if not args.compiled:
                    kw["enforce_eager"] = True
                llm = LLM(**kw)
                start_s = time.perf_counter() - t0
                params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)
                llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:8]], params, use_tqdm=False)  # warm-up
                t0 = time.perf_counter()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
                rate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
                rows.append((f"vllm {dtype}, KV {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB (start {start_s:.0f} s)", rate))
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception:
                    pass
                del llm
            vl = max(v for _, v in rows)
            for label, v in rows + [(f"hf generate {dtype}, batch {args.batch}", hf_b),
                                    (f"hf generate {dtype}, one at a time ({single})", hf_1)]:
                print(f"{label:40s} {v:10.0f} {vl / v:17.2f}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _smollm2():
    from dipnet.pipeline.pretrained import pretrained_base

    return pretrained_base("smollm2-135m-instruct", progress=False)


if __name__ == "__main__":
    main()
