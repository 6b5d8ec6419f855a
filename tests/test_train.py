"""``optimlab train`` end to end, on a tiny random BERT written as a real checkpoint directory
(config.json + model.safetensors + the default model's tokenizer.json) and a few dozen rows.

Covered: every artifact of a run (CS224N prediction files, metrics.json, best weights that
reproduce the predictions), your own files, exact resume (bit-identical weights, optimizer
state and history after two interruptions), atomic checkpoints (a crash mid-save leaves the
previous one), SAM through the trainer (rho = 0 is the plain run exactly), 2-process DDP under
torchrun (gloo) equal to 1 process on the same global batch, one-line errors with exit code 2,
the weight-decay groups, the schedule and the length-grouped batches.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimlab import cli
from optimlab.data import load_split
from optimlab.models import BertConfig, BertModel, build_classifier, default_model_dir
from optimlab.registry import param_groups_weight_decay
from optimlab.train import (TrainConfig, length_grouped_batches, lr_multiplier, resume, train,
                            write_predictions)

N_TRAIN, N_EVAL, BATCH = 40, 16, 8          # 5 updates per epoch


def _tiny_dir(path: Path, dropout: float) -> Path:
    """A Hugging Face-style BERT directory: 2 layers of width 32, random weights."""
    path.mkdir(parents=True)
    cfg = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    (path / "config.json").write_text(json.dumps(cfg))
    model = BertModel(BertConfig.from_hf(cfg))
    model.reset_parameters(torch.Generator().manual_seed(0))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    shutil.copy(default_model_dir() / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """With dropout, so that resuming must restore the RNG to be exact."""
    return _tiny_dir(tmp_path_factory.mktemp("models") / "tiny-bert", dropout=0.1)


@pytest.fixture(scope="module")
def tiny_nodrop(tmp_path_factory):
    """Without any dropout: deterministic updates (SAM rho=0, DDP comparisons)."""
    return _tiny_dir(tmp_path_factory.mktemp("models") / "tiny-bert-nodrop", dropout=0.0)


def _args(model_dir, out, *extra) -> list[str]:
    return ["train", "--model-dir", str(model_dir), "--max-train-samples", str(N_TRAIN),
            "--max-eval-samples", str(N_EVAL), "--batch-size", str(BATCH), "--epochs", "2",
            "--lr", "1e-3", "--no-progress", "--out", str(out), *map(str, extra)]


def _cli(argv, capsys):
    """Run ``optimlab`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:            # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _ckpt(run) -> dict:
    return torch.load(Path(run) / "checkpoint.pt", weights_only=True)


def _metrics(run) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def _assert_same_state(a: dict, b: dict) -> None:
    """Model weights and optimizer state bit-identical."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"], b["optimizer"]
    sa, sb = sa.get("base_optimizer", sa), sb.get("base_optimizer", sb)
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, v in sa["state"][i].items():
            w = sb["state"][i][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, key)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def _history(run) -> list[tuple]:
    return [(e["epoch"], e["train_loss"], e["dev_acc"], e["updates"], e["lr_end"])
            for e in _metrics(run)["epochs"]]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run (2 epochs, 2 micro-batches per update, dropout on)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(_args(tiny, out, "--grad-accum", 2)) == 0
    return out


# ------------------------------------------------------------------ a whole run, every artifact
def _read_predictions(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[0] == "id \t Predicted_Sentiment \n"           # CS224N's header, byte for byte
    rows = []
    for line in lines[1:]:
        assert line.endswith(" \n") and line.count(" , ") == 1, line
        rid, label = line[:-2].split(" , ")
        rows.append((rid, int(label)))
    return rows


def test_cli_run_writes_every_artifact(tiny, reference):
    run = reference
    assert {p.name for p in run.iterdir()} >= {"checkpoint.pt", "best_model.safetensors",
                                               "metrics.json", "predictions"}
    dev_records = load_split("sst", "dev")[:N_EVAL]
    dev = _read_predictions(run / "predictions" / "full-model-sst-dev-out.csv")
    test = _read_predictions(run / "predictions" / "full-model-sst-test-out.csv")
    assert [r for r, _ in dev] == [r.id for r in dev_records]
    assert [r for r, _ in test] == [r.id for r in load_split("sst", "test-student")[:N_EVAL]]
    assert all(0 <= p < 5 for _, p in dev + test)

    m = _metrics(run)
    assert m["status"] == "finished" and m["task"] == "sst" and m["num_labels"] == 5
    assert m["examples"] == {"train": N_TRAIN, "dev": N_EVAL, "test": N_EVAL}
    assert m["updates"] == {"per_epoch": 5, "total": 10, "warmup": 1, "done": 10}
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    for e in m["epochs"]:
        assert e["train_loss"] > 0 and e["train_seconds"] > 0 and e["train_examples_per_s"] > 0
    assert m["epochs"][-1]["lr_end"] == 0.0                      # linear decay to 0
    assert m["best_dev_acc"] == max(e["dev_acc"] for e in m["epochs"])
    assert m["epochs"][m["best_epoch"] - 1]["dev_acc"] == m["best_dev_acc"]
    assert m["config"]["lr"] == 1e-3 and m["config"]["optimizer"] == "adamw"
    assert m["config"]["max_length"] == 128 and m["config"]["grad_accum"] == 2
    assert m["memory"]["peak_rss_gb"] > 0 and m["wall_time_s"] > 0
    assert m["versions"]["torch"] and m["versions"]["optimlab"]
    assert "revision" in m["git"] and m["world_size"] == 1

    # the dev file holds the best epoch's predictions, and the saved best weights give them
    assert sum(p == r.label for (_, p), r in zip(dev, dev_records)) / N_EVAL == m["best_dev_acc"]
    from safetensors.torch import load_file
    model = build_classifier(tiny, num_labels=5, fine_tune_mode="full-model")
    model.load_state_dict(load_file(str(run / "best_model.safetensors")))
    model.eval()
    from optimlab.models import collate, load_tokenizer
    batch = collate(dev_records, load_tokenizer(tiny, max_length=128), 0)
    with torch.no_grad():
        pred = model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
    assert pred == [p for _, p in dev]


def test_own_files(tiny, tmp_path, capsys):
    rows = load_split("cfimdb", "train")[:30]
    with open(tmp_path / "train.tsv", "w", encoding="utf-8") as f:
        f.write("id\tsentence\tsentiment\n")
        f.writelines(f"t{i}\t{r.text[:300].replace(chr(34), '')}\t{r.label}\n"
                     for i, r in enumerate(rows[:24]))
    with open(tmp_path / "dev.csv", "w", encoding="utf-8") as f:   # comma-separated, no ids
        f.write("text,label\n")
        f.writelines(f"\"{r.text[:200].replace(chr(34), '')}\",{r.label}\n" for r in rows[24:])
    with open(tmp_path / "test.tsv", "w", encoding="utf-8") as f:   # unlabeled
        f.write("id\treview\n")
        f.writelines(f"x{i}\t{r.text[:100].replace(chr(34), '')}\n" for i, r in enumerate(rows[:5]))
    out = tmp_path / "run"
    code, _, err = _cli(["train", "--model-dir", str(tiny), "--train-file", tmp_path / "train.tsv",
                         "--dev-file", tmp_path / "dev.csv", "--test-file", tmp_path / "test.tsv",
                         "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", out,
                         "--fine-tune-mode", "last-linear-layer"], capsys)
    assert code == 0, err
    m = _metrics(out)
    assert m["task"] is None and m["num_labels"] == 2
    assert m["parameters"]["trained"] == 32 * 2 + 2              # the head only
    dev = _read_predictions(out / "predictions" / "last-linear-layer-custom-dev-out.csv")
    assert [r for r, _ in dev] == [str(i) for i in range(6)]     # 0-based positions as ids
    test = _read_predictions(out / "predictions" / "last-linear-layer-custom-test-out.csv")
    assert [r for r, _ in test] == [f"x{i}" for i in range(5)]


def test_a_gpt2_checkpoint_directory(tmp_path, capsys):
    """A Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json + merges.txt)
    trains through the same command: last-token pooling, the loss goes down."""
    transformers = pytest.importorskip("transformers")
    import tokenizers as tk
    texts = [r.text for r in load_split("sst", "train")[:400]]
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    model_dir = tmp_path / "tiny-gpt2"
    model_dir.mkdir()
    bpe.model.save(str(model_dir))                              # vocab.json + merges.txt
    cfg = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=128, n_embd=32,
                                  n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2Model(cfg).save_pretrained(str(model_dir))
    out = tmp_path / "run"
    code, printed, err = _cli(["train", "--model-dir", model_dir, "--max-train-samples", 64,
                         "--max-eval-samples", 16, "--batch-size", 8, "--epochs", 3,
                         "--lr", "3e-3", "--no-progress", "--out", out], capsys)
    assert code == 0, err
    m = _metrics(out)
    assert f"gpt2 from {model_dir}" in printed + err and m["num_labels"] == 5
    assert m["parameters"]["trained"] == m["parameters"]["total"]
    losses = [e["train_loss"] for e in m["epochs"]]
    assert losses[-1] < losses[0], losses
    assert len(_read_predictions(out / "predictions" / "full-model-sst-test-out.csv")) == 16


# ------------------------------------------------------------------ resume: exactly the same run
def test_resume_after_two_interruptions_is_bit_identical(tiny, reference, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _cli(_args(tiny, run, "--grad-accum", 2, "--stop-after", 3), capsys)
    assert code == 0, err
    ck = _ckpt(run)
    assert ck["position"]["epoch"] == 0 and ck["position"]["step_in_epoch"] == 3
    assert _metrics(run)["status"] == "stopped"
    assert not (run / "predictions" / "full-model-sst-test-out.csv").exists()
    # resume, stop again in the second epoch (after an epoch end and its evaluation)
    code, _, err = _cli(["train", "--resume", str(run), "--stop-after", "7"], capsys)
    assert code == 0, err
    assert _ckpt(run)["position"]["epoch"] == 1 and _ckpt(run)["position"]["step"] == 7
    code, _, err = _cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0, err
    _assert_same_state(_ckpt(run), _ckpt(reference))
    assert _history(run) == _history(reference)
    assert _metrics(run)["status"] == "finished"
    for name in ("full-model-sst-dev-out.csv", "full-model-sst-test-out.csv"):
        assert (run / "predictions" / name).read_text() == \
            (reference / "predictions" / name).read_text()


def test_checkpoint_is_atomic_a_crash_mid_save_loses_nothing(tiny, reference, tmp_path,
                                                             monkeypatch):
    run = tmp_path / "run"
    train(TrainConfig(**_config(tiny, run), grad_accum=2, stop_after=2))
    before = _ckpt(run)
    assert before["position"]["step"] == 2

    real_save = torch.save

    def crash_mid_save(obj, f, *args, **kwargs):       # half a file, then the process "dies"
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("simulated crash during torch.save")
    monkeypatch.setattr(torch, "save", crash_mid_save)
    with pytest.raises(KeyboardInterrupt):
        resume(run, save_every=1)                      # update 3 is done, then its save dies
    monkeypatch.setattr(torch, "save", real_save)

    after = _ckpt(run)                                 # still the checkpoint of update 2
    assert after["position"]["step"] == 2
    _assert_same_state(after, before)
    assert [p.name for p in run.iterdir() if ".tmp" in p.name] == []
    resume(run)                                        # and it still resumes exactly
    _assert_same_state(_ckpt(run), _ckpt(reference))


def _config(model_dir, out, **kw) -> dict:
    return dict(task="sst", model_dir=str(model_dir), max_train_samples=N_TRAIN,
                max_eval_samples=N_EVAL, batch_size=BATCH, epochs=2, lr=1e-3, progress=False,
                out=str(out), **kw)


# ------------------------------------------------------------------ SAM through the trainer
def test_sam_through_the_trainer(tiny_nodrop, tmp_path):
    def run(name, **kw):
        return train(TrainConfig(**_config(tiny_nodrop, tmp_path / name), grad_accum=2,
                                 dropout=0.0, **kw))
    plain, rho0, sam = run("plain"), run("rho0", sam=True, rho=0.0), run("sam", sam=True, rho=0.5)
    # rho = 0: both passes at w, so SAM is its base optimizer exactly, accumulation included
    _assert_same_state(_ckpt(tmp_path / "rho0"), _ckpt(tmp_path / "plain"))
    assert "base_optimizer" in _ckpt(tmp_path / "sam")["optimizer"]
    diff = max((a - b).abs().max().item() for a, b in
               zip(_ckpt(tmp_path / "sam")["model"].values(),
                   _ckpt(tmp_path / "plain")["model"].values()))
    assert diff > 1e-6
    assert plain["status"] == rho0["status"] == sam["status"] == "finished"
    assert sam["config"]["sam"] and sam["config"]["rho"] == 0.5
    assert TrainConfig(sam=True).resolved().out == os.path.join("runs", "sst-adamw-sam")


def test_bf16_autocast(tiny_nodrop, tmp_path):
    cfg = {**_config(tiny_nodrop, tmp_path / "bf16"), "epochs": 1}
    m = train(TrainConfig(**cfg, bf16=True))
    assert m["status"] == "finished" and m["config"]["bf16"]
    assert 0 < m["epochs"][0]["train_loss"] < 10
    assert all(v.dtype == torch.float32 for v in _ckpt(tmp_path / "bf16")["model"].values())


def test_a_weight_decay_schedule_runs_and_resumes_exactly(tiny, tmp_path, capsys):
    """--wd-schedule cosine --wd-final 0 --wd-form compensated: the decay's multiplier goes
    from 1 to 0 over the run (recorded per epoch), the run differs from constant decay, and a
    run stopped inside an epoch and resumed ends bit for bit as the uninterrupted one (the
    scheduler's state and the compensation buffers are in the checkpoint)."""
    extra = ["--weight-decay", "0.5", "--wd-schedule", "cosine", "--wd-final", "0",
             "--wd-form", "compensated"]
    assert _cli(_args(tiny, tmp_path / "whole", *extra), capsys)[0] == 0
    assert _cli(_args(tiny, tmp_path / "cut", *extra, "--stop-after", 3), capsys)[0] == 0
    assert _cli(["train", "--resume", tmp_path / "cut", "--no-progress"], capsys)[0] == 0
    assert _cli(_args(tiny, tmp_path / "constant", "--weight-decay", "0.5"), capsys)[0] == 0
    whole, cut = _ckpt(tmp_path / "whole"), _ckpt(tmp_path / "cut")
    _assert_same_state(whole, cut)
    assert _history(tmp_path / "whole") == _history(tmp_path / "cut")
    assert whole["wd_scheduler"]["last_epoch"] == 10
    assert any("wd_compensation" in st for st in whole["optimizer"]["state"].values())
    ends = [e["wd_multiplier_end"] for e in _metrics(tmp_path / "whole")["epochs"]]
    assert ends[0] == pytest.approx(0.5) and ends[1] == 0.0
    constant = _ckpt(tmp_path / "constant")["model"]
    assert any(not torch.equal(v, constant[k]) for k, v in whole["model"].items())


# ------------------------------------------------------------------ DDP: torchrun, 2 processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list, timeout: float = 150) -> None:
    """``optimlab`` under torchrun with 2 gloo processes (one thread each); fails the test on an
    error or after ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "optimlab.cli", *map(str, argv)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun with 2 gloo processes did not finish within {timeout:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]


needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(), reason="needs gloo")


@needs_gloo
def test_torchrun_two_processes_equal_one_process(tiny_nodrop, tmp_path, capsys):
    extra = ["--sam", "--rho", "0.05", "--max-grad-norm", "0.5", "--dropout", "0", "--device",
             "cpu"]
    _torchrun(_args(tiny_nodrop, tmp_path / "ddp", *extra))
    code, _, err = _cli(_args(tiny_nodrop, tmp_path / "one", *extra), capsys)
    assert code == 0, err

    ddp, one = _ckpt(tmp_path / "ddp"), _ckpt(tmp_path / "one")
    assert ddp["world_size"] == 2 and len(ddp["ranks"]) == 2 and one["world_size"] == 1
    assert _metrics(tmp_path / "ddp")["examples"]["train"] == N_TRAIN
    for k in one["model"]:          # same global batches; only the summation order differs
        assert torch.allclose(ddp["model"][k], one["model"][k], rtol=1e-4, atol=1e-6), k
    start = BertModel.from_pretrained(tiny_nodrop).state_dict()
    moved = (one["model"]["encoder.layers.0.ffn_in.weight"] -
             start["layers.0.ffn_in.weight"]).abs().max()
    assert moved > 1e-3                                 # the comparison is not trivial
    assert [e["dev_acc"] for e in _metrics(tmp_path / "ddp")["epochs"]] == \
        [e["dev_acc"] for e in _metrics(tmp_path / "one")["epochs"]]


# ------------------------------------------------------------------ FSDP: --fsdp under torchrun
# 43 examples: the last batch (3) splits 2 + 1, so --grad-accum 2 must give each process one
# micro-batch; 16 dev examples in batches of 6: 2 batches on one process, 1 on the other, so
# evaluation must keep the processes in step (FSDP gathers the weights in every forward)
FSDP_ARGS = ["--fsdp", "--sam", "--rho", "0.05", "--max-grad-norm", "0.5", "--dropout", "0",
             "--device", "cpu", "--grad-accum", "2", "--max-train-samples", "43",
             "--eval-batch-size", "6"]


def _sharded_state(run) -> dict:
    """The model and optimizer of a --fsdp run's last checkpoint, as whole tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = _ckpt(run)
    assert "model" not in ckpt and "optimizer" not in ckpt       # they are in the DCP directory
    assert [d.name for d in (Path(run) / "sharded").iterdir()] == [ckpt["sharded"]]
    dcp_to_torch_save(Path(run) / "sharded" / ckpt["sharded"], Path(run) / "whole.pt")
    return torch.load(Path(run) / "whole.pt", weights_only=False)


def _sharded_diff(a: dict, b: dict) -> float:
    """Largest difference between the weights and optimizer states of two --fsdp runs, absolute
    for values up to 1 and relative above (as tests/test_sharded.py measures)."""
    pairs = [(a["model"][k], b["model"][k]) for k in b["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    pairs += [(v, sb[name][key]) for name in sa for key, v in sa[name].items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return max(((x.double() - y.double()).abs() / y.double().abs().clamp(min=1.0)).max().item()
               for x, y in pairs if y.numel())


@pytest.fixture(scope="module")
def fsdp_runs(tiny_nodrop, tmp_path_factory):
    """With --fsdp: one process; 2 processes; 2 processes stopped after 3 updates and resumed
    in one; one process stopped after 7 and resumed in 2."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: root / name for name in ("one", "two", "two_to_one", "one_to_two")}
    assert cli.main(_args(tiny_nodrop, runs["one"], *FSDP_ARGS)) == 0
    _torchrun(_args(tiny_nodrop, runs["two"], *FSDP_ARGS))
    _torchrun(_args(tiny_nodrop, runs["two_to_one"], *FSDP_ARGS, "--stop-after", 3))
    assert cli.main(["train", "--resume", str(runs["two_to_one"]), "--no-progress"]) == 0
    assert cli.main(_args(tiny_nodrop, runs["one_to_two"], *FSDP_ARGS, "--stop-after", 7)) == 0
    _torchrun(["train", "--resume", runs["one_to_two"], "--no-progress"])
    return runs


@needs_gloo
def test_fsdp_two_processes_equal_one_process(fsdp_runs, tiny_nodrop):
    """``--fsdp`` on 2 processes (each transformer block and the model ``fully_shard``ed; SAM,
    2 micro-batches, clipping) ends with the weights and optimizer state of one process on the
    same global batches, up to summation order; so do the dev accuracies and the best model."""
    one, two = _sharded_state(fsdp_runs["one"]), _sharded_state(fsdp_runs["two"])
    assert _sharded_diff(two, one) <= 1e-6
    start = BertModel.from_pretrained(tiny_nodrop).state_dict()
    moved = (one["model"]["encoder.layers.0.ffn_in.weight"] -
             start["layers.0.ffn_in.weight"]).abs().max()
    assert moved > 1e-3                                 # the comparison is not trivial
    m1, m2 = _metrics(fsdp_runs["one"]), _metrics(fsdp_runs["two"])
    assert m2["world_size"] == 2 and m2["config"]["fsdp"] and m2["examples"]["train"] == 43
    # each process holds half the optimizer state (to a row: dim 0 does not always halve)
    state = [m["optimizer_state_mb"] for m in m2["memory"]["per_process"]]
    assert sum(state) == pytest.approx(m1["memory"]["optimizer_state_mb"], abs=0.01)
    assert all(0.45 < s / m1["memory"]["optimizer_state_mb"] < 0.55 for s in state), state
    assert [e["dev_acc"] for e in m2["epochs"]] == [e["dev_acc"] for e in m1["epochs"]]
    assert [e["train_loss"] for e in m2["epochs"]] == \
        pytest.approx([e["train_loss"] for e in m1["epochs"]], rel=1e-6)
    from safetensors.torch import load_file
    b1, b2 = (load_file(str(fsdp_runs[r] / "best_model.safetensors")) for r in ("one", "two"))
    assert b1.keys() == b2.keys() and all(torch.allclose(b2[k], b1[k], atol=1e-6) for k in b1)
    for split in ("dev", "test"):
        name = f"predictions/full-model-sst-{split}-out.csv"
        assert (fsdp_runs["two"] / name).read_text() == (fsdp_runs["one"] / name).read_text()


@needs_gloo
@pytest.mark.parametrize("run", ["two_to_one", "one_to_two"])
def test_fsdp_resumes_on_another_number_of_processes(fsdp_runs, run):
    """A --fsdp checkpoint written by 2 processes continues in one, and one written by one
    process continues in 2 (torch.distributed.checkpoint reshards it): the run ends as the
    uninterrupted one, the epoch's loss carried over from every process that wrote it."""
    resumed, one = _sharded_state(fsdp_runs[run]), _sharded_state(fsdp_runs["one"])
    assert _sharded_diff(resumed, one) <= 1e-6
    m, m1 = _metrics(fsdp_runs[run]), _metrics(fsdp_runs["one"])
    assert m["status"] == "finished" and m["updates"]["done"] == m1["updates"]["done"]
    assert [e["train_loss"] for e in m["epochs"]] == \
        pytest.approx([e["train_loss"] for e in m1["epochs"]], rel=1e-6)
    assert [e["dev_acc"] for e in m["epochs"]] == [e["dev_acc"] for e in m1["epochs"]]


def test_fsdp_in_one_process_resumes_bit_for_bit(tiny, tmp_path, capsys):
    """One process with --fsdp trains unsharded and checkpoints through
    torch.distributed.checkpoint: stopped inside an epoch and resumed (dropout on: the RNG
    travels too), it ends bit for bit as the uninterrupted run."""
    assert _cli(_args(tiny, tmp_path / "whole", "--fsdp"), capsys)[0] == 0
    assert _cli(_args(tiny, tmp_path / "cut", "--fsdp", "--stop-after", 3), capsys)[0] == 0
    code, out, err = _cli(["train", "--resume", tmp_path / "cut", "--no-progress"], capsys)
    assert code == 0 and "resuming at epoch 1, update 3" in out, err
    a, b = _sharded_state(tmp_path / "whole"), _sharded_state(tmp_path / "cut")
    assert _sharded_diff(a, b) == 0.0
    assert _history(tmp_path / "whole") == _history(tmp_path / "cut")


def test_fsdp_a_failed_sharded_save_is_one_line_and_keeps_the_last_checkpoint(
        tiny, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    run, real, calls = tmp_path / "run", dcp.save, []

    def save(*a, **k):
        calls.append(1)
        if len(calls) == 2:           # the second checkpoint: a rank's write fails
            real(*a, **k)
            raise CheckpointException("CheckpointException ranks:dict_keys([0])", {})
        return real(*a, **k)
    monkeypatch.setattr(dcp, "save", save)
    code, _, err = _cli(_args(tiny, run, "--fsdp", "--save-every", "2"), capsys)
    monkeypatch.undo()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "sharded checkpoint" in err and "the previous checkpoint.pt is intact" in err
    assert _ckpt(run)["position"]["step"] == 2
    assert len(list((run / "sharded").iterdir())) == 1         # the failed one is removed
    code, _, err = _cli(["train", "--resume", run, "--no-progress"], capsys)
    assert code == 0, err


def test_fsdp_a_missing_sharded_checkpoint_is_one_line(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(_args(tiny, run, "--fsdp", "--stop-after", 2), capsys)[0] == 0
    shutil.rmtree(run / "sharded")
    code, _, err = _cli(["train", "--resume", run, "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing or incomplete" in err, err


# ------------------------------------------------------------------ bad input: one line, exit 2
@pytest.fixture
def bad_files(tmp_path, tiny):
    (tmp_path / "no_text.tsv").write_text("id\tfoo\tlabel\n1\thello\t0\n")
    (tmp_path / "bad_label.tsv").write_text("sentence\tlabel\nfine film\tgreat\n")
    (tmp_path / "ok.tsv").write_text("sentence\tlabel\nfine film\t1\nawful\t0\n")
    (tmp_path / "gap.tsv").write_text("sentence\tlabel\nfine film\t1\nawful\t0\ntypo\t99\n")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "nomodel").mkdir()
    torch.save({"config": {}, "optimizer": {}}, tmp_path / "nomodel" / "checkpoint.pt")
    for name, damage in (("truncated", lambda d: (d / "model.safetensors").write_bytes(
                              (d / "model.safetensors").read_bytes()[:1000])),
                         ("empty", lambda d: (d / "model.safetensors").write_bytes(b"")),
                         ("badtok", lambda d: (d / "tokenizer.json").write_text("{not json"))):
        d = tmp_path / name
        shutil.copytree(tiny, d)
        damage(d)
    return tmp_path


BAD_INPUTS = [
    (["--task", "imdb"], "invalid choice: 'imdb'"),
    (["--optimizer", "adamx"], "unknown optimizer 'adamx'; choose from"),
    (["--model-dir", "{tmp}/missing"], "does not exist: give a Hugging Face checkpoint"),
    (["--model-dir", "{tmp}"], "has no config.json"),
    (["--train-file", "{tmp}/nope.tsv", "--dev-file", "{tmp}/ok.tsv"],
     "--train-file '{tmp}/nope.tsv' does not exist"),
    (["--train-file", "{tmp}/no_text.tsv", "--dev-file", "{tmp}/ok.tsv"], "no text column"),
    (["--train-file", "{tmp}/ok.tsv", "--dev-file", "{tmp}/bad_label.tsv"],
     "line 2: label 'great' is not an integer"),
    (["--train-file", "{tmp}/ok.tsv"], "--train-file needs --dev-file"),
    (["--task", "sst", "--train-file", "{tmp}/ok.tsv", "--dev-file", "{tmp}/ok.tsv"],
     "not both"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch-size", "4", "--grad-accum", "8"], "lower --grad-accum or raise --batch-size"),
    (["--warmup", "-0.1"], "--warmup must be >= 0"),
    (["--warmup", "2.5"], "--warmup must be a fraction"),
    (["--sam", "--rho", "-0.1"], "--rho must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--wd-mode", "timescale"], "--wd-mode timescale takes --weight-decay as tau"),
    (["--wd-final", "2"], "--wd-final 2.0 needs --wd-schedule linear or cosine"),
    (["--wd-schedule", "cosine", "--wd-final", "-1"], "--wd-final must be >= 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--max-length", "1"], "--max-length must be >= 2"),
    (["--asam"], "--asam needs --sam"),
    (["--resume", "{tmp}/nothing"], "no checkpoint.pt there"),
    (["--resume", "{tmp}/done"], "is not a readable optimlab checkpoint"),
    (["--resume", "{tmp}/done", "--lr", "1"], "drop --lr"),
    (["--out", "{tmp}/done"], "already holds a run (checkpoint.pt): continue it with --resume"),
    (["--resume", "{tmp}/nomodel"], "is not a complete optimlab checkpoint (no 'best', 'history', "
                                    "'model'"),
    (["--model-dir", "{tmp}/truncated"], "cannot load the model from {tmp}/truncated"),
    (["--model-dir", "{tmp}/empty"], "cannot load the model from {tmp}/empty"),
    (["--model-dir", "{tmp}/badtok"], "cannot load the tokenizer from {tmp}/badtok"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "meta"], "--device 'meta': optimlab train runs on cpu or cuda"),
    (["--seed", str(2 ** 70)], "--seed must be an integer in [0, 2**63)"),
    (["--train-file", "{tmp}", "--dev-file", "{tmp}/ok.tsv"], "is a directory: give a TSV/CSV"),
    (["--train-file", "{tmp}/gap.tsv", "--dev-file", "{tmp}/ok.tsv"],
     "gap.tsv, line 4: label 99, but labels 2..98 never occur"),
    (["--task", "sst", "--num-labels", "1"], "--num-labels is for your own files: sst has 5"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, tiny, bad_files, capsys):
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv]
    message = message.replace("{tmp}", str(bad_files))
    base = ["train", "--no-progress"]
    if "--resume" not in argv:
        base += ["--max-train-samples", "8", "--max-eval-samples", "4"]
        if "--model-dir" not in argv:
            base += ["--model-dir", str(tiny)]
        if "--out" not in argv:
            base += ["--out", str(bad_files / "run")]
    code, out, err = _cli(base + argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("optimlab"), err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(tiny, tmp_path, capsys):
    code, _, err = _cli(_args(tiny, tmp_path / "run", "--device", "cuda"), capsys)
    assert code == 2 and "CUDA is not available here; use --device cpu" in err


def test_the_command_itself_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optimlab.cli", "train", "--model-dir",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--model-dir" in proc.stderr


# ------------------------------------------------------------------ the pieces
def test_weight_decay_groups_in_the_trainer(tiny, reference):
    model = build_classifier(tiny, num_labels=5, fine_tune_mode="full-model")
    model.encoder.pooler.requires_grad_(False)          # mean pooling: the trainer freezes it
    groups = param_groups_weight_decay(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in groups[0]["params"]]
    keep = [names[id(p)] for p in groups[1]["params"]]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert "encoder.embeddings.word.weight" in decay and "head.weight" in decay
    assert all(not n.endswith("bias") and ".norm." not in n for n in decay)
    assert "head.bias" in keep and "encoder.embeddings.norm.weight" in keep
    assert not any("pooler" in n for n in decay + keep)
    m = _metrics(reference)
    assert m["parameters"]["decayed"] == sum(p.numel() for p in groups[0]["params"])
    saved = _ckpt(reference)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [0.01, 0.0]
    assert [len(g["params"]) for g in saved] == [len(decay), len(keep)]


def test_lr_schedule():
    total, warmup = 100, 10
    f = {s: [lr_multiplier(t, total=total, warmup=warmup, schedule=s) for t in range(total + 1)]
         for s in ("linear", "cosine", "constant")}
    for s in f:
        assert f[s][:warmup] == [(t + 1) / (warmup + 1) for t in range(warmup)]   # ramp, > 0
        assert f[s][warmup] == 1.0
    assert f["linear"][55] == pytest.approx(0.5) and f["linear"][total] == 0.0
    assert f["cosine"][55] == pytest.approx(0.5) and f["cosine"][total] == 0.0
    assert f["cosine"][30] > f["linear"][30]
    assert set(f["constant"][warmup:]) == {1.0}
    assert all(a >= b for a, b in zip(f["linear"][warmup:], f["linear"][warmup + 1:]))


def test_length_grouped_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 100, (1003,), generator=g).tolist()

    def plan(epoch, grouped=True):
        return length_grouped_batches(lengths, 32, torch.Generator().manual_seed(epoch), grouped)
    a = plan(0)
    assert sorted(i for b in a for i in b) == list(range(1003))
    assert [len(b) for b in a[:-1]] == [32] * 31 and len(a[-1]) == 1003 - 31 * 32
    assert plan(0) == a and plan(1) != a                        # seeded, new order each epoch

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)
    assert padding(a) < 0.25 * padding(plan(0, grouped=False))
    firsts = [max(lengths[i] for i in b) for b in a[:-1]]
    assert firsts != sorted(firsts, reverse=True)               # batch order is shuffled


def test_prediction_file_format(tmp_path):
    write_predictions(tmp_path / "p.csv", ["a1", "b2"], [3, 0])
    assert (tmp_path / "p.csv").read_bytes() == b"id \t Predicted_Sentiment \na1 , 3 \nb2 , 0 \n"


# ------------------------------------------------------------------ a run directory's promises
def test_a_second_run_on_a_directory_in_use_fails_at_once(tiny, tmp_path, capsys):
    from optimlab._run import RunLock
    held = RunLock(tmp_path / "run")
    held.acquire()
    try:
        code, _, err = _cli(_args(tiny, tmp_path / "run"), capsys)
        assert code == 2 and err.count("\n") == 1
        assert "is in use by another run (pid " in err and "choose another --out" in err
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
    finally:
        held.release()
    assert _cli(_args(tiny, tmp_path / "run"), capsys)[0] == 0


def test_the_lock_of_a_killed_run_is_taken_over(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c",
                           "import os, signal, sys; from optimlab._run import RunLock; "
                           f"RunLock({str(run)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9
    code, out, _ = _cli(_args(tiny, run), capsys)
    assert code == 0 and "took over the lock of a run that ended without releasing it" in out


def _fail_at_first_forward(monkeypatch):
    import optimlab.train as T
    def boom(model, batch):
        raise RuntimeError("boom at the first forward pass")
    monkeypatch.setattr(T, "_loss_fn", boom)


def test_overwrite_replaces_the_previous_run_only_once_the_new_one_has_a_checkpoint(
        tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _cli(_args(tiny, run), capsys)[0] == 0
    before = {n: (run / n).read_bytes() for n in ("checkpoint.pt", "metrics.json",
                                                  "best_model.safetensors")}
    with monkeypatch.context() as m:          # the new run fails: the old one is put back
        _fail_at_first_forward(m)
        with pytest.raises(RuntimeError, match="boom"):
            _cli(_args(tiny, run, "--overwrite", "--lr", "5e-4"), capsys)
    assert {n: (run / n).read_bytes() for n in before} == before
    assert not (run / ".replaced").exists()
    # a new run killed before its first checkpoint leaves the old run set aside: the next run
    # on the directory puts it back first (then refuses: no --overwrite)
    (run / ".replaced").mkdir()
    for n in ("checkpoint.pt", "metrics.json", "best_model.safetensors", "predictions"):
        os.replace(run / n, run / ".replaced" / n)
    code, _, err = _cli(_args(tiny, run), capsys)
    assert code == 2 and "already holds a run" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    # with a checkpoint of its own the new run is kept, and the old one is gone
    code, _, err = _cli(_args(tiny, run, "--overwrite", "--lr", "5e-4"), capsys)
    assert code == 0, err
    assert (run / "checkpoint.pt").read_bytes() != before["checkpoint.pt"]
    assert not (run / ".replaced").exists()


def test_temporary_files_of_interrupted_saves_are_removed(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(_args(tiny, run, "--stop-after", "3"), capsys)[0] == 0
    (run / "predictions").mkdir(exist_ok=True)
    for name in (".checkpoint.pt.tmp-4242", "predictions/.x-dev-out.csv.tmp-4242"):
        (run / name).write_bytes(b"half a file")
    code, out, _ = _cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0 and "removed 2 temporary file(s)" in out
    assert not list(run.glob("**/.*.tmp-*"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(
        tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    import optimlab._run as R
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:           # the second checkpoint: the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:595] . "
                               "PytorchStreamWriter failed writing file data/3: file write failed")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(R.torch, "save", save)
    code, _, err = _cli(_args(tiny, run, "--save-every", "2"), capsys)
    monkeypatch.setattr(R.torch, "save", real)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "checkpoint.pt failed" in err and "the previous checkpoint.pt is intact" in err
    assert _ckpt(run)["position"]["step"] == 2
    assert not list(run.glob(".*.tmp-*"))


def test_resume_checks_the_data_and_works_from_another_directory(tiny, tmp_path, capsys,
                                                                  monkeypatch):
    rows = "".join(f"sentence {i} {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(24))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows.splitlines(True)[:12]))
    monkeypatch.chdir(tmp_path)            # relative paths, then a resume from elsewhere
    argv = ["train", "--model-dir", str(tiny), "--train-file", "train.tsv", "--dev-file",
            "dev.tsv", "--batch-size", "8", "--epochs", "2", "--no-progress", "--out", "run",
            "--stop-after", "2"]
    assert _cli(argv, capsys)[0] == 0
    assert _ckpt(tmp_path / "run")["config"]["train_file"] == str(tmp_path / "train.tsv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = _cli(["train", "--resume", str(tmp_path / "run"), "--no-progress",
                         "--stop-after", "2"], capsys)
    assert code == 2 and "--stop-after 2: this run is already at update 2" in err
    # the same rows with other labels: the resume would not be the promised one
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows.replace("\t1\n", "\t7\n")
                                        .replace("\t0\n", "\t1\n").replace("\t7\n", "\t0\n"))
    code, _, err = _cli(["train", "--resume", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and "the training data changed since the checkpoint" in err
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    assert _cli(["train", "--resume", str(tmp_path / "run"), "--no-progress"], capsys)[0] == 0
    assert _metrics(tmp_path / "run")["status"] == "finished"


def _strict(path) -> dict:
    def no(x):
        raise ValueError(f"non-strict JSON constant {x}")
    return json.loads(Path(path).read_text(), parse_constant=no)


def test_a_diverged_run_stops_with_its_last_good_checkpoint(tiny, tmp_path, capsys,
                                                           monkeypatch):
    import optimlab.train as T
    real, calls = T._loss_fn, []

    def loss_fn(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) >= 4 else loss      # update 4 diverges
    monkeypatch.setattr(T, "_loss_fn", loss_fn)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="skipped"):
        code, out, _ = _cli(_args(tiny, run, "--save-every", "2"), capsys)
    assert code == T.EXIT_DIVERGED
    assert "the run diverged at update 4" in out
    m = _strict(run / "metrics.json")
    assert m["status"] == "diverged" and m["skipped_updates"] == 1
    assert _ckpt(run)["position"]["step"] == 2            # the last good state, not after


def test_a_run_stopped_by_a_signal_exits_128_plus_the_signal(tiny, tmp_path):
    import signal
    import time
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "optimlab.cli", *_args(tiny, run, "--epochs",
                             "500", "--save-every", "1")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    m = _strict(run / "metrics.json")
    assert m["status"] == "stopped" and m["stop_signal"] == "SIGTERM"


def test_resume_refuses_a_configuration_this_version_resolves_otherwise(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(_args(tiny, run, "--stop-after", "2"), capsys)[0] == 0
    state = _ckpt(run)
    state["config"]["max_length"] = None         # as if a default had been left to resolve
    torch.save(state, run / "checkpoint.pt")
    code, _, err = _cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 2 and "resolves the saved configuration differently (max_length: None" in err
