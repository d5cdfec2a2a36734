"""The embedded tiny base: files, tokenizer round trip, and that pretraining really happened."""

import json

import torch

from dipnet.pipeline import synthetic
from dipnet.pipeline.base_model import EOS_ID, tiny_base
from dipnet.pipeline.recipe import TinyBaseSettings


def test_base_directory_is_a_hf_model(tiny_base_dir):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json", "pretrain.json"):
        assert (tiny_base_dir / name).is_file(), name
    gen = json.loads((tiny_base_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS_ID
    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64, 80, 96, 112, 128)  # vLLM CPU head sizes
    # Cached by content hash: asking again returns the same directory without rebuilding.
    assert tiny_base(TinyBaseSettings(), seed=0, progress=False) == tiny_base_dir


def test_tokenizer_round_trip(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    for text in ["Question: Ann has 12 pens. She buys 7 more.\nAnswer: 12 + 7 = 19\n#### 19",
                 "Janet's ducks lay 16 eggs per day; $2 each (50% off)!"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(" 57", add_special_tokens=False).input_ids) == 1  # numbers < 100: one token


def test_pretrained_far_below_untrained(tiny_base_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    text = synthetic.pretraining_corpus(40, seed=4242)  # text neither model has seen
    ids = torch.tensor([sum((tok(t).input_ids for t in text), [])[:8 * 96]]).view(8, 96)
    trained = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_base_dir)).eval()
    with torch.no_grad():
        lt = trained(input_ids=ids, labels=ids).loss.item()
        lu = untrained(input_ids=ids, labels=ids).loss.item()
    assert lu > 5.0 and lt < 0.4 * lu, (lt, lu)


def test_base_tiny_out_copies_the_cached_build(tiny_base_dir, tmp_path, capsys, monkeypatch):
    """`dipnet base tiny --out DIR` reuses the cached build (no second pretraining) and writes an
    independent copy: DIR's files are not the cache's (editing them leaves the cache intact)."""
    from dipnet.pipeline import base_model
    from dipnet.pipeline.cli import main

    def no_build(*a, **k):
        raise AssertionError("the cached tiny base was built again")

    monkeypatch.setattr(base_model, "_build", no_build)
    assert main(["base", "tiny", "--out", str(tmp_path / "b")]) == 0
    assert "copied from the cache" in capsys.readouterr().out
    out = tmp_path / "b"
    names = sorted(p.name for p in tiny_base_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != ".dipnet.json":
            assert (out / name).read_bytes() == (tiny_base_dir / name).read_bytes(), name
            assert (out / name).stat().st_ino != (tiny_base_dir / name).stat().st_ino, name


def test_a_cache_entry_is_built_once_by_concurrent_callers(tmp_path):
    """Two runs (or the suite's two workers) wanting the same cache entry: the first builds it
    under the lock, the others wait and then find it (outputs.built_once)."""
    import threading
    import time

    from dipnet.pipeline.outputs import built_once

    out, builds = tmp_path / "cache" / "entry", []

    def build():
        builds.append(threading.get_ident())
        time.sleep(0.2)  # a build in progress: the others must wait, not start their own
        out.mkdir()

    def want():
        built_once(out, out.is_dir, build)

    threads = [threading.Thread(target=want) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and out.is_dir()
