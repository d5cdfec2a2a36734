"""The embedded default base model: a tiny Llama, pretrained here, because no hub is reachable.

`build_tiny_base(settings, out_dir)`:
1. trains a sentencepiece BPE tokenizer on generated text (arithmetic chains, short stories,
   problems in the eval prompt format, every printable ASCII character);
2. builds a `LlamaForCausalLM` of the configured size (head dim 32 so vLLM's CPU backend runs it);
3. pretrains it briefly on synthetic arithmetic text (`synthetic.pretraining_corpus`);
4. saves a Hugging Face directory: `model.safetensors`, `config.json`, `generation_config.json`
   (EOS set), `tokenizer.model`, `tokenizer_config.json`, `tokenizer.json`, and `pretrain.json`
   with the held-out loss before and after pretraining.

`tiny_base(settings)` returns the directory from the user's cache, building it once per content
hash (settings + the generator version), so every run and test shares one build.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import string
import time
from pathlib import Path

from dipnet.pipeline import synthetic

# Bump when the corpus, tokenizer or pretraining procedure changes: it invalidates the cache.
GENERATOR_VERSION = "tiny-base-v3"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 3, 0, 1, 2


def cache_root() -> Path:
    return Path(os.environ.get("DIPNET_CACHE", Path.home() / ".cache" / "dipnet"))


def settings_hash(settings, seed: int) -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, "seed": seed, **settings.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_base(settings, seed: int = 0, progress: bool = True) -> Path:
    """The cached tiny base for these settings, built on first use."""
    from dipnet.pipeline.outputs import built_once

    out = cache_root() / "base" / settings_hash(settings, seed)
    built_once(out, (out / "pretrain.json").is_file, lambda: build_tiny_base(settings, out, seed=seed, progress=progress))
    return out


def _tokenizer_text(seed: int) -> list[str]:
    docs = synthetic.pretraining_corpus(3000, seed)
    probs = synthetic.generate_split(400, seed + 7, ood=False) + synthetic.generate_split(100, seed + 8, ood=True)
    prompts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in probs]
    return docs + prompts + [string.printable.strip()] * 20


def train_tokenizer(vocab_size: int, seed: int, out_dir: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_text(seed)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        # identity normalisation and kept whitespace: newlines survive, so answers keep their lines.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=False, minloglevel=2, num_threads=1,  # one thread: deterministic
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    # AutoTokenizer builds the fast tokenizer from tokenizer.model (needs protobuf);
    # LlamaTokenizer(vocab_file=...) would silently return empty encodings with transformers 5.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": 4096,
    }, indent=2))


def _packed_batches(tok, docs: list[str], seq_len: int):
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d).input_ids + [EOS_ID])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def build_tiny_base(settings, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Build, pretrain and save the tiny base into `out_dir` (written atomically)."""
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.outputs import output_dir

    if settings.hidden_size % settings.num_heads:
        raise UsageError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
    with output_dir(out_dir, "model") as tmp:
        _build(settings, tmp, seed, progress)
    return Path(out_dir)


def _build(settings, tmp: Path, seed: int, progress: bool) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    train_tokenizer(settings.vocab_size, seed, tmp)
    config = LlamaConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=settings.max_position,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    tok = AutoTokenizer.from_pretrained(tmp)
    model = LlamaForCausalLM(config)

    seq_len = min(128, settings.max_position)
    train = _packed_batches(tok, synthetic.pretraining_corpus(12000, seed + 100), seq_len)
    held = _packed_batches(tok, synthetic.pretraining_corpus(200, seed + 999), seq_len)[:32]

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=held, labels=held).loss.item()
        model.train()
        return loss

    loss_untrained = held_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps, warm = settings.pretrain_steps, max(1, settings.pretrain_steps // 20)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pretrain tiny base", disable=not progress, leave=False)
    for step in bar:
        lr = settings.pretrain_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, train.shape[0], (settings.pretrain_batch,), generator=gen)
        batch = train[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loss_trained = held_loss()

    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False).save_pretrained(tmp)
    tok.save_pretrained(tmp)  # adds tokenizer.json next to tokenizer.model
    (tmp / "pretrain.json").write_text(json.dumps({
        "held_out_loss_untrained": loss_untrained, "held_out_loss_pretrained": loss_trained,
        "steps": steps, "seconds": round(time.time() - t0, 1), "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()), "generator": GENERATOR_VERSION,
    }, indent=2))


if __name__ == "__main__":
    # `make install` runs `python -P -m dipnet.pipeline.base_model --beside-install DONE` beside
    # the installer: the default tiny base (the demo's and every test's) is then in the cache, or
    # half-way, when they start. One thread while the installer runs, every core once it is done:
    # make creates the file DONE, then sends USR2. The shell that starts this ignores USR2 until
    # the handler below is set, and the handler is set before DONE is looked at, so a signal sent
    # before either still leaves the build on every core.
    # On an AVX2 host the weights were the same on 1 and 2 threads (bit for bit: all 560 steps,
    # switching from 1 to 2 threads 40 s in, against a 2-thread build). On an AVX-512 host they
    # are not: one step's gradients differ by ~1e-8 between 1 and 2 threads, so the build depends
    # on when the install finished; tests compare with tolerances that hold on any such base
    # (docs/testing.md).
    import signal
    import sys

    import torch

    from dipnet.pipeline.recipe import TinyBaseSettings

    if "--beside-install" in sys.argv:
        done = Path(sys.argv[sys.argv.index("--beside-install") + 1])
        every = torch.get_num_threads()
        signal.signal(signal.SIGUSR2, lambda *_: torch.set_num_threads(every))  # runs on the main thread
        torch.set_num_threads(every if done.exists() else 1)
    t0 = time.time()
    print(f"tiny base ready in {tiny_base(TinyBaseSettings(), seed=0, progress=False)} ({time.time() - t0:.0f} s)")
