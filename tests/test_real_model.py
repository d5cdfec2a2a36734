"""A real pretrained LLM through the whole pipeline: SmolLM2-135M-Instruct from the package registry.

GGUF -> Hugging Face import (exact), DIP conversion (mean path bit for bit), a 3-step 2-rank
ZeRO-3 LoRA + DIP run on real GSM8K, export, and vLLM generation on 20 GSM8K test problems beside
the transformers engine. The model is fetched once (about 93 MB) and cached by content hash; the
GSM8K data comes from ../shared/data/gsm8k.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED_GSM8K, built_for_the_session

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"


def _need(reason_fn):
    why = reason_fn()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to run the real-model tests: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def smol():
    """The imported SmolLM2 directory (fetched and imported on first use, then cached)."""
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.pretrained import pretrained_base

    try:
        return pretrained_base(NAME, progress=False)
    except UsageError as exc:
        why = f"cannot fetch {NAME}: {exc}"
        _need(lambda: why)


@pytest.fixture(scope="module")
def converted(smol, tmp_path_factory):
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.dip import DipConfig

    config = DipConfig(method="dip", init_variance=3e-3, scale="relative")
    return built_for_the_session(tmp_path_factory, "smol-dip", lambda d: convert(smol, d / "dip", config)) / "dip"


def test_import_is_exact(smol):
    """The import verified logits equal to the GGUF model's; here its tensors are checked
    independently against gguf's own dequantisation of the file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    info = json.loads((smol / "import.json").read_text())
    assert info["max_logit_diff"] == 0.0 and info["class"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008 and info["vocab"] == 49152 and info["chat_template"]
    reader = GGUFReader(info["source"])
    # dipnet's own header reader (it skips arrays) agrees with gguf's on every other field.
    from dipnet.pipeline.pretrained import gguf_metadata

    keys = {k for k in reader.fields if not k.startswith("GGUF.")}  # GGUF.*: the reader's own header entries
    scalars = {k: reader.fields[k].contents() for k in keys if reader.fields[k].types[0].name != "ARRAY"}
    ours = gguf_metadata(Path(info["source"]), keys)
    assert len(scalars) > 20 and set(ours) == keys
    assert {k: ours[k] for k in scalars} == scalars
    tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight"}
    with safe_open(str(smol / "model.safetensors"), framework="pt") as f:
        for g, h in pairs.items():
            t = tensors[g]
            ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(f.get_tensor(h).shape)
            assert torch.equal(f.get_tensor(h), ref.float()), h


def test_smollm2_chat_template_trains_every_assistant_turn(smol):
    """SmolLM2's own ChatML template (it adds a default system turn): the ids are the template's,
    and the trained stretches are exactly each assistant turn's content and its <|im_end|>."""
    from transformers import AutoTokenizer

    from dipnet.pipeline.data import tokenize_rows

    tok = AutoTokenizer.from_pretrained(smol)
    convo = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "20, since 5 x 4 = 20."}]
    (ex,), _ = tokenize_rows([{"messages": convo, "_line": 1}], "chat", tok, 512, "truncate", "c.jsonl")
    assert ex["input_ids"] == list(tok.apply_chat_template(convo, tokenize=True, return_dict=True)["input_ids"])
    runs, cur = [], []
    for t, label in zip(ex["input_ids"], ex["labels"]):
        if label != -100:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    assert [tok.decode(r) for r in runs + [cur]] == ["5<|im_end|>\n", "20, since 5 x 4 = 20.<|im_end|>\n"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex["input_ids"])  # masked, but there


def test_convert_keeps_the_mean_path_bit_for_bit(smol, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dipnet.pipeline import dip
    from dipnet.pipeline.models import load_causal_lm

    base = AutoModelForCausalLM.from_pretrained(smol).eval()
    model = load_causal_lm(converted)
    dip.set_dip_mode(model, "mean")
    assert len(dip.projections(model)) == 30
    tok = AutoTokenizer.from_pretrained(smol)
    x = tok(["Question: Natalia sold clips to 48 of her friends in April.\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        a, b = base(**x).logits, model.eval()(**x).logits
        dip.set_dip_mode(model, "sample")
        c = model(**x).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def lora_run(converted, tmp_path_factory):
    """3 optimizer steps of 2-rank ZeRO-3 LoRA + DIP on real GSM8K (sequences cut to 128 tokens)."""
    _need(lambda: None if (SHARED_GSM8K / "train.jsonl").is_file() else "../shared/data/gsm8k not present")
    from trainhelp import metrics, train

    cfg = {"train.max_steps": 3, "train.save_every": 3, "train.zero_stage": 3, "train.method": "lora",
           "train.lora.r": 4, "train.micro_batch_size": 1, "train.lr": 1e-3, "train.warmup_steps": 1,
           "dip.method": "dip", "dip.init_variance": 3e-3, "dip.lr_scale": 50.0,
           "data.train": str(SHARED_GSM8K / "train.jsonl"), "data.limit": 16, "data.max_length": 128}
    out = built_for_the_session(tmp_path_factory, "smol-train",
                                lambda d: train(d / "run", cfg, model_dir=converted, timeout=900)) / "run"
    return out, metrics(out)


def test_zero3_lora_dip_trains_and_exports(lora_run, converted, tmp_path):
    from dipnet.pipeline.export import export_checkpoint

    out, rows = lora_run
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["nll"] == r["nll"] for r in rows)
    assert rows[0]["nll"] < 4.0  # a pretrained model: GSM8K answers are far from uniform (ln 49152 = 10.8)
    lam = rows[-1]["lambda"]
    assert len(lam) == 30 and any(abs(v["mean"] - 3e-3) > 1e-6 for v in lam.values())  # λ trained
    s = export_checkpoint(out, tmp_path / "export")
    assert s["lora_merged"] == 30 * 4 and s["dip_projections"] == 30 and s["max_logit_diff"] <= s["tolerance"]
    assert s["parameters"] == 134_515_008


def test_vllm_and_hf_on_20_gsm8k_problems(smol, tmp_path, capsys):
    """Greedy generation on the same 20 GSM8K prompts with both engines. Float32 on both, but
    different kernels: report how often the outputs agree (do not require 100%). One shot keeps the
    transformers side affordable on 2 cores (it prefills ~250 tokens/s at this size). The answer
    NLL (one more prefill of every prompt and answer: 21 s for 20 on transformers, 12 s on vLLM)
    is compared problem by problem on the first 5, on the same engine."""
    _need(lambda: None if (SHARED_GSM8K / "test.jsonl").is_file() else "../shared/data/gsm8k not present")
    from dipnet.eval.evaluate import evaluate_model, max_model_len
    from dipnet.eval.vllm_runner import USER_KV_CACHE_GIB, VllmEngine

    kw = dict(shots=1, limit=20, max_new_tokens=64, gsm8k_path=str(SHARED_GSM8K), progress=False)
    # 20 prompts of at most ~450 + 64 tokens fill ~0.5 GB of KV cache: 1 GiB is given, not the 4 GiB default.
    engine = VllmEngine(smol, tmp_path / "vllm", max_model_len(json.loads((smol / "config.json").read_text())),
                        kv_tokens=20 * 600)
    try:
        assert USER_KV_CACHE_GIB is not None or os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
        rv = evaluate_model(smol, ["gsm8k"], tmp_path / "v", engine="vllm", vllm_engine=engine, answer_nll=False, **kw)
        nv = evaluate_model(smol, ["gsm8k"], tmp_path / "vn", engine="vllm", vllm_engine=engine,
                            **{**kw, "limit": 5, "max_new_tokens": 1})
    finally:
        engine.close()
    rh = evaluate_model(smol, ["gsm8k"], tmp_path / "h", engine="hf", answer_nll=False, **kw)
    nh = evaluate_model(smol, ["gsm8k"], tmp_path / "hn", engine="hf", **{**kw, "limit": 5, "max_new_tokens": 1})
    sv = [json.loads(line) for line in (tmp_path / "v" / "samples_gsm8k.jsonl").read_text().splitlines()]
    sh = [json.loads(line) for line in (tmp_path / "h" / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert len(sv) == len(sh) == 20 and [s["prompt"] for s in sv] == [s["prompt"] for s in sh]
    agree = sum(a["output"] == b["output"] for a, b in zip(sv, sh)) / 20
    with capsys.disabled():
        print(f"\nSmolLM2 vLLM vs transformers greedy agreement on 20 GSM8K problems: {agree:.0%}; "
              f"flexible-extract {rv['tasks']['gsm8k']['scores']['flexible-extract']['accuracy']:.2f} vs "
              f"{rh['tasks']['gsm8k']['scores']['flexible-extract']['accuracy']:.2f}")
    assert agree >= 0.5, agree  # the engines must mostly agree; exact agreement is not guaranteed
    assert sum(bool(s["output"].strip()) for s in sv) >= 15  # it answers (it may also stop at once)
    nll = {e: [json.loads(line)["answer_nll"] for line in (tmp_path / d / "samples_gsm8k.jsonl").read_text().splitlines()]
           for e, d in (("vllm", "vn"), ("hf", "hn"))}
    assert rv["tasks"]["gsm8k"]["teacher_forced"] is None and rh["tasks"]["gsm8k"]["teacher_forced"] is None
    assert nv["tasks"]["gsm8k"]["teacher_forced"] and nh["tasks"]["gsm8k"]["teacher_forced"]
    assert len(nll["vllm"]) == len(nll["hf"]) == 5
    assert max(abs(a - b) for a, b in zip(nll["vllm"], nll["hf"])) < 1e-3, nll
