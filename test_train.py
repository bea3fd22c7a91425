"""train.py tests on CPU with the `tiny` preset (a tiny ViT and a tiny random LM with the real
tokenizer): the command line, packing, exact resume, DDP = one process, faults, checkpoints.
The runs are subprocesses of a few seconds each; tolerances are stated where results may differ."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import cli
import data as D
import generate
import model as M
import pretrain
import train
from checkpoint import UserError
from conftest import ENV, HERE


def tiny(tokenizer_dir, data, out_dir, *args):
    return ["--config", "tiny", "--tokenizer", tokenizer_dir, "--data_dir", data, "--out_dir", str(out_dir),
            "--dtype", "fp32", "--final_eval", "false", *args]


def run(args, timeout=120, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=timeout, **{"env": ENV, **kw})


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- command line

def test_booleans_presets_and_overrides():
    assert train.parse_args(["--compile"]) == ("default", {"compile": True})
    assert train.parse_args(["--compile", "false"])[1] == {"compile": False}
    assert train.parse_args(["--packing", "true", "--config", "tiny"]) == ("tiny", {"packing": True})
    cfg = train.make_config(*train.parse_args(["--config", "tiny", "--batch_size", "3"]))
    assert cfg.batch_size == 3 and cfg.lm == "tiny" and cfg.compile is True
    default = train.make_config("default", {})
    assert default.out_dir == "out" and default.lm == "" and default.pretrain_steps > 0
    for name in ("nanovlm-222m", "smolvlm-256m"):
        train.make_config(name, {})
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--compile", "maybe"])
    assert e.value.code == 2
    with pytest.raises(UserError, match="batch_size"):
        train.make_config("tiny", {"batch_size": 0})


def test_one_flag_style_presets_reachable_and_ignored_flags_refused():
    """Flags: underscores, the hyphen spelling too, no prefixes. Every ViT preset is reachable with
    --vision; a preset's vit_* settings go with its own ViT; a flag that would be ignored is an error."""
    assert train.parse_args(["--max-steps", "3", "--vit_width=48", "--lr-lm=0.5"])[1] == {
        "max_steps": 3, "vit_width": 48, "lr_lm": 0.5}
    with pytest.raises(SystemExit):
        train.parse_args(["--max_step", "3"])  # a prefix is not a guess
    assert train.make_config("tiny", {}).vit == M.VISION_PRESETS["tiny"]
    demo = train.make_config("default", {}).vit
    assert (demo.vit_image_size, demo.vit_width, demo.vit_pos_embed) == (64, 128, "sincos2d")
    for name, shape in M.VISION_PRESETS.items():
        assert train.make_config("default", {"vision": name}).vit == shape
    assert train.make_config("default", {"vision": "siglip-b16-224", "vit_depth": 3}).vit.vit_depth == 3
    with pytest.raises(UserError, match="--vit_width is ignored with a pretrained --vision"):
        train.make_config("default", {"vision": "google/siglip-base-patch16-224", "vit_width": 64})
    with pytest.raises(UserError, match="--lm is ignored with --init_from"):
        train.make_config("default", {"init_from": "out", "lm": "tiny"})
    # a run saved before the ViT's fields were nested (flat vit_* keys) resumes with its own shape
    saved = dataclasses.asdict(train.make_config("tiny", {"vit_width": 48}))
    flat = {**saved.pop("vit"), **saved}
    assert train.make_config("default", {"max_steps": 7}, saved=flat) == train.make_config(
        "tiny", {"vit_width": 48, "max_steps": 7})
    assert cli.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and cli.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert cli.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and cli.gpu_peak_flops("NVIDIA L40S") == 362e12


def test_help_and_bad_input_are_one_line(tmp_path, tokenizer_dir):
    r = run(["--help"])
    assert r.returncode == 0 and "--max_steps" in r.stdout and "--compile" in r.stdout
    for args, message in [(["--synthetic", "0", "--data_dir", str(tmp_path / "none")], "no train.jsonl"),
                          (["--resume"], "nothing to resume"),
                          (["--batch_size", "0"], "out of range"),
                          (["--no_such_flag", "1"], "unrecognized arguments"),
                          (["--max_steps", "ten"], "invalid int value")]:
        r = run(["--config", "tiny", "--tokenizer", tokenizer_dir, "--out_dir", str(tmp_path / "out"), *args])
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- data

def test_packed_rows_give_the_same_per_sample_loss(tokenizer_dir, data):
    """Three samples packed into one row (block-diagonal attention, positions restarting per
    sample) give each sample the loss it has alone: max difference <= 1e-5."""
    torch.manual_seed(0)
    vlm, processor = train.build_model(train.make_config("tiny", {"tokenizer": tokenizer_dir}))
    vlm.eval()
    ds = D.ChatDataset(D.load_split(data, "train"), processor, 2048)
    samples = [ds[i] for i in range(3)]

    def loss(batch):
        with torch.no_grad():
            return vlm(batch["input_ids"], batch["pixel_values"], batch.get("attention_mask"), batch["labels"])[1].item()
    packed = D.collate(samples, pack_len=10_000)
    assert packed["input_ids"].shape[0] == 1 and packed["attention_mask"][0].max() == 3
    for k, s in enumerate(samples):
        only_k = dict(packed, labels=torch.where(packed["attention_mask"] == k + 1, packed["labels"], -100))
        assert abs(loss(only_k) - loss(D.collate([s]))) <= 1e-5
    padded = D.collate(samples)  # right padding without a mask: the same mean over all answer tokens
    assert "attention_mask" not in padded and abs(loss(padded) - loss(packed)) <= 1e-5


def test_cached_samples_are_decoded_once(tokenizer_dir, data, tmp_path):
    """cache_data: a sample's second draw comes from memory (its image file is gone by then) with
    the same tokens and pixels; the image shift still depends on the draw's stream position."""
    processor = train.build_model(train.make_config("tiny", {"tokenizer": tokenizer_dir}))[1]
    records = D.load_split(data, "train")[:2]
    for r in records:
        shutil.copy(os.path.join(data, r["images"][0]), tmp_path / os.path.basename(r["images"][0]))
        r["images"] = [str(tmp_path / os.path.basename(r["images"][0]))]
    ds = D.ChatDataset(records, processor, 2048, shift=2, cache=True)
    first = ds[(0, 5)]
    os.remove(records[0]["images"][0])
    again = ds[(0, 5)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[2][0], again[2][0])
    assert any(not torch.equal(first[2][0], ds[(0, p)][2][0]) for p in range(6, 12))
    assert D.ChatDataset(records, processor, 2048)[(0, 5)] is None  # uncached: the missing image is skipped


def test_stage1_word_targets_and_loss(tokenizer_dir, data):
    """Stage 1: each image's word target holds exactly its answer's tokens (compact ids), weighted
    so that they sum to the number of answer tokens; the proxy adds the word head's loss, whose
    logits are cosines with the LM's own embeddings, and trains the VLM's own ViT and projector."""
    torch.manual_seed(0)
    cfg = train.make_config("tiny", {"tokenizer": tokenizer_dir})
    vlm, processor = train.build_model(cfg)
    ds = D.ChatDataset(D.load_split(data, "train"), processor, 2048)
    proxy, remap = pretrain.build_proxy(vlm, cfg, pretrain.proxy_vocab(ds))
    samples = [ds[i] for i in range(4)]
    batch = pretrain.collate(samples, remap=remap)
    assert batch["image_words"].shape == (4, int(remap.max()) + 1)
    for words, (_, labels, _, _) in zip(batch["image_words"], samples):
        answer = remap[labels[labels != -100]]
        assert set(words.nonzero()[:, 0].tolist()) == set(answer.tolist())
        assert abs(words.sum().item() - len(answer)) <= 1e-4
    args = batch["input_ids"], batch["pixel_values"], None, batch["labels"]
    with torch.no_grad():
        plain, with_words = proxy(*args)[1], proxy(*args, image_words=batch["image_words"])[1]
    assert with_words > plain > 0
    # the word head scores image tokens against the LM's input embeddings of the compact vocabulary
    tokens = vlm.projector(vlm.vision(batch["pixel_values"]))
    vocab = (remap > 0).nonzero()[:, 0][remap[remap > 0].argsort()]  # token id of compact id 1, 2, ..
    cosine = F.cosine_similarity(tokens[:, :, None], vlm.lm.tok_embed.weight[vocab][None, None], dim=-1)
    expected = torch.logsumexp(proxy.word_scale.exp() * cosine, dim=1)
    assert (proxy.word_logits[:, 1:] - expected).abs().max() <= 1e-4
    # stage 1 trains the VLM's own ViT and projector (shared modules), not copies
    assert proxy.vision is vlm.vision and proxy.projector is vlm.projector
    before = vlm.projector.proj.weight.clone()
    opt = torch.optim.SGD(proxy.parameters(), lr=0.1)
    proxy(*args, image_words=batch["image_words"])[1].backward()
    opt.step()
    assert (vlm.projector.proj.weight - before).abs().max() > 0


def test_micro_batches_shard_one_global_order():
    one = D.MicroBatches(10, 2, 2, 0, 1, seed=0)
    two = [D.MicroBatches(10, 2, 1, r, 2, seed=0) for r in (0, 1)]
    a, b = iter(one), [iter(x) for x in two]
    for _ in range(7):  # crosses epochs: every sample once per epoch
        assert next(a) == next(b[0]) and next(a) == next(b[1])
    resumed = iter(D.MicroBatches(10, 2, 2, 0, 1, seed=0, start=8))
    fresh = iter(D.MicroBatches(10, 2, 2, 0, 1, seed=0))
    for _ in range(4):
        next(fresh)
    assert [next(resumed) for _ in range(4)] == [next(fresh) for _ in range(4)]


def test_type_weights_change_the_mix_and_resume_exactly():
    """--type_weights: a type of weight 0 is never drawn, one of weight 3 about 3x as often as one
    of weight 1 (6000 draws: within 2.5-3.5x); a resumed stream continues the same draws."""
    records = [{"type": t} for t in ("a", "b", "c") * 10]
    weights = D.sample_weights(records, "b=0,c=3")
    assert D.sample_weights(records, "") is None
    draws = iter(D.MicroBatches(30, 60, 1, 0, 1, seed=0, weights=weights))
    types = [records[i]["type"] for _ in range(100) for i, _ in next(draws)]
    assert types.count("b") == 0 and 2.5 <= types.count("c") / types.count("a") <= 3.5
    resumed = iter(D.MicroBatches(30, 4, 1, 0, 1, seed=0, start=44, weights=weights))
    fresh = iter(D.MicroBatches(30, 4, 1, 0, 1, seed=0, weights=weights))
    for _ in range(11):
        next(fresh)
    assert [next(resumed) for _ in range(5)] == [next(fresh) for _ in range(5)]
    for bad in ("color", "color=x", "color=-1"):
        with pytest.raises(UserError):
            train.make_config("tiny", {"type_weights": bad})


# ----------------------------------------------------------------------------- runs

def test_run_writes_a_loadable_model_and_its_records(tmp_path, tokenizer_dir, data):
    out = tmp_path / "out"
    r = run(tiny(tokenizer_dir, data, out, "--pretrain_steps", "3", "--max_steps", "6", "--eval_interval", "3",
                 "--final_eval", "true", "--num_workers", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = log(out)
    assert [x["step"] for x in rows] == list(range(1, 10)) and all("loss" in x for x in rows)
    assert [x["stage"] for x in rows] == ["pretrain"] * 3 + ["vlm"] * 6
    assert [x["step"] for x in rows if "accuracy" in x] == [3, 6, 9]  # end of stage 1, then every 3 VLM steps
    final = json.load(open(out / "final_eval.json"))
    assert 0 <= final["accuracy"] <= 1 and final["wall_s"] > 0 and len(final["per_type"]) == 7
    for path in (out, out / "best"):
        vlm, processor = M.VLM.from_pretrained(path), M.Processor.from_pretrained(path)
        assert processor.system_prompt == "" and vlm.cfg.image_tokens == processor.tokens_per_image
    assert (out / "loss.png").stat().st_size > 1000
    meta, tensors = checkpoint.read_state(out)
    assert meta["state"]["step"] == 6 and meta["state"]["stage"] == "vlm" and "rng/torch" in tensors


def test_resume_continues_exactly(tmp_path, tokenizer_dir, data):
    """9 steps straight == 5 steps (the first inside stage 2), a new process with --resume, 4 more:
    identical losses, bit for bit; and again for a run stopped inside stage 1. Image shifts and a
    data worker are on: they must replay too."""
    args = ("--pretrain_steps", "4", "--lr_decay_steps", "5", "--augment_shift", "2", "--num_workers", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(tiny(tokenizer_dir, data, straight, *args, "--max_steps", "5")).returncode == 0
    r = run(tiny(tokenizer_dir, data, split, *args, "--max_steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["--resume", "--out_dir", str(split), "--max_steps", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["loss"] for x in log(straight)] == [x["loss"] for x in log(split)]
    assert len(log(split)) == 9
    # stopped inside stage 1 (Ctrl-C after its second step), resumed: the same losses again
    inside = tmp_path / "inside"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *tiny(tokenizer_dir, data, inside, *args,
                          "--max_steps", "5", "--pretrain_steps", "40")], cwd=HERE, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    while not (os.path.exists(inside / "log.jsonl") and len(log(inside)) >= 2) and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    straight40 = tmp_path / "straight40"
    assert run(tiny(tokenizer_dir, data, straight40, *args, "--max_steps", "5", "--pretrain_steps", "40")).returncode == 0
    assert checkpoint.read_state(inside)[0]["state"]["stage"] == "pretrain"
    assert run(["--resume", "--out_dir", str(inside)]).returncode == 0
    assert [x["loss"] for x in log(inside)] == [x["loss"] for x in log(straight40)]


@pytest.mark.parametrize("options", [(), ("--mp_type", "attention_pool", "--lm_image_attention", "bidirectional",
                                           "--vit_stem", "hmlp", "--vit_parallel_blocks")], ids=["plain", "design"])
def test_two_gloo_processes_equal_one(tmp_path, tokenizer_dir, data, options):
    """The same global batches: 1 process x accumulation 2 vs 2 DDP processes (gloo) x 1, in both
    stages, also with the design lab's options. Only the order of float sums differs: losses and
    gradient norms agree to 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--pretrain_steps", "3", "--max_steps", "4", "--num_workers", "0", *options)
    r = run(tiny(tokenizer_dir, data, one, *common, "--pretrain_batch_size", "8", "--batch_size", "4",
                 "--grad_accum", "2"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(HERE, "train.py"), *tiny(tokenizer_dir, data, two, *common,
                                                              "--pretrain_batch_size", "4", "--batch_size", "4")],
                       capture_output=True, text=True, cwd=HERE, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = log(one), log(two)
    assert len(a) == len(b) == 7
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5
    # gradients too (a constant error in their scale would hide behind clipping): norms within 1e-5 relative
    assert max(abs(x["grad_norm"] / y["grad_norm"] - 1) for x, y in zip(a, b)) <= 1e-5


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tokenizer_dir, data, capsys):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                          *tiny(tokenizer_dir, data, out, "--pretrain_steps", "2", "--max_steps", "100000",
                                "--eval_interval", "0")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not (os.path.exists(out / "log.jsonl") and len(log(out)) >= 4):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "checkpoint saved" in err and "Traceback" not in err, err[-3000:]
    step = checkpoint.read_state(out)[0]["state"]["step"] + 2  # + the 2 pretraining steps
    assert log(out)[-1]["step"] == step
    # generate.py on the unfinished run answers, with a warning naming the fix
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    caption = ["--model", str(out), "--image", str(image), "--max-new-tokens", "2", "--device", "cpu"]
    assert generate.main(caption) == 0
    err = capsys.readouterr().err
    assert f"stopped at VLM step {step - 2} of 100000" in err and "--resume" in err, err
    r = run(["--resume", "--out_dir", str(out), "--max_steps", str(step - 2 + 2)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in log(out)] == list(range(1, step + 3))
    assert generate.main(caption) == 0 and "warning" not in capsys.readouterr().err  # finished: no warning


def test_corrupt_images_are_skipped_and_counted(tmp_path, tokenizer_dir, data):
    """24 samples, 4 with a corrupt image; 2 epochs in each stage: 16 skipped, training goes on."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    lines = open(d / "train.jsonl").readlines()[:24]
    (d / "train.jsonl").write_text("".join(lines))
    for line in lines[:4]:
        (d / json.loads(line)["images"][0]).write_bytes(b"not a png")
    out = tmp_path / "out"
    r = run(tiny(tokenizer_dir, str(d), out, "--pretrain_steps", "3", "--pretrain_batch_size", "16", "--max_steps", "6",
                 "--batch_size", "8", "--final_eval", "true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 16 unusable samples" in r.stdout
    assert json.load(open(out / "final_eval.json"))["skipped_samples"] == 16


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, tokenizer_dir, data, monkeypatch, capsys):
    forward, calls = M.VLM.forward, {"n": 0}

    def nan_on_some_calls(self, *args, **kw):  # training calls 3 and 4 of the VLM stage give NaN
        logits, loss = forward(self, *args, **kw)
        if self.training and self.cfg.lm.lm_hidden == 64:
            calls["n"] += 1
            if calls["n"] in bad:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(M.VLM, "forward", nan_on_some_calls)
    bad = {3, 4}
    out = tmp_path / "a"
    assert train.main(tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "6", "--final_eval",
                           "true")) == 0
    rows = log(out)
    assert [x.get("skipped_step", False) for x in rows] == [False, False, True, True, False, False]
    assert json.load(open(out / "final_eval.json"))["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in M.VLM.from_pretrained(out).parameters())
    bad, calls["n"] = set(range(1, 100)), 0
    assert train.main(tiny(tokenizer_dir, data, tmp_path / "b", "--pretrain_steps", "0", "--max_bad_steps", "3")) == 1
    assert "NaN/inf 3 steps in a row" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints

def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, tokenizer_dir, data, monkeypatch):
    out = tmp_path / "out"
    assert train.main(tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "2")) == 0
    before = (out / checkpoint.STATE_FILE).read_bytes()
    meta, _ = checkpoint.read_state(out)

    def killed(*_):
        raise KeyboardInterrupt  # the process dies after writing the temporary file, before the rename
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        layer = torch.nn.Linear(2, 2)
        checkpoint.save_state(str(out), layer, torch.optim.AdamW(layer.parameters()),
                              torch.amp.GradScaler("cpu", enabled=False), {"state": {"step": 99}})
    assert (out / checkpoint.STATE_FILE).read_bytes() == before
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # the partial file is removed


def test_resume_unpickles_nothing(tmp_path, tokenizer_dir, data, monkeypatch):
    out = tmp_path / "out"
    assert train.main(tiny(tokenizer_dir, data, out, "--pretrain_steps", "2", "--max_steps", "1")) == 0

    def no_pickles(*args, **kw):
        raise AssertionError("torch.load called while resuming")
    monkeypatch.setattr(torch, "load", no_pickles)
    assert train.main(["--resume", "--out_dir", str(out), "--max_steps", "2"]) == 0
    assert [x["step"] for x in log(out)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- hardening (issue 18)

def test_sigterm_saves_like_ctrl_c_and_a_second_run_is_refused(tmp_path, tokenizer_dir, data):
    """SIGTERM (schedulers, `timeout`) saves and exits 130 like Ctrl-C; while a run holds out_dir a
    second one is refused in one line; a dead run's lock and the temporary files of killed writes
    are cleaned up by the next run, which resumes."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                          *tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "100000",
                                "--eval_interval", "0")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    deadline = time.time() + 90
    while time.time() < deadline and not (os.path.exists(out / "log.jsonl") and len(log(out)) >= 2):
        time.sleep(0.2)
    second = run(tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "2"))
    assert second.returncode == 2 and "in use by another run" in second.stderr
    assert second.stderr.strip().count("\n") == 0, second.stderr
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "checkpoint saved" in err and "Traceback" not in err, err[-3000:]
    step = checkpoint.read_state(out)[0]["state"]["step"]
    assert step >= 2 and log(out)[-1]["step"] == step
    (out / ".lock").write_text("999999999 " + __import__("socket").gethostname())  # its run died (kill -9)
    (out / ".tmp-abc123").write_text("half a checkpoint")
    (out / ".best-tmp").mkdir()
    with open(out / "log.jsonl", "a") as f:
        f.write('\n{"step": 99, "sta')  # a blank line and a line torn by the crash
    r = run(["--resume", "--out_dir", str(out), "--max_steps", str(step + 1)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in log(out)] == list(range(1, step + 2))
    assert not {".lock", ".tmp-abc123", ".best-tmp"} & set(os.listdir(out))


def test_resume_refuses_what_cannot_change(tmp_path, tokenizer_dir, data, capsys):
    """A model setting or a trainable set other than the saved run's is one line, exit 2; the
    checkpoint is left as it was."""
    out = tmp_path / "out"
    assert train.main(tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "1")) == 0
    before = (out / checkpoint.STATE_FILE).read_bytes()
    capsys.readouterr()
    for flags, message in ((["--vit_width", "64"], "--vit_width cannot change on --resume"),
                           (["--lm_train_layers", "1"], "--lm_train_layers cannot change on --resume"),
                           (["--lr_vision", "0"], "the parts being trained differ")):
        assert train.main(["--resume", "--out_dir", str(out), "--max_steps", "2", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (out / checkpoint.STATE_FILE).read_bytes() == before
    assert train.main(["--resume", "--out_dir", str(out), "--max_steps", "2", "--lr_vision", "5e-4"]) == 0


def test_records_validated_up_front_and_no_usable_data_is_an_error(tmp_path, tokenizer_dir, data, capsys):
    """Records that would crash training midway (no user turn, non-text content) are skipped and
    counted, in train and val; the content-parts form of chat templates is read as text; a run whose
    every sample is unusable stops with one line instead of training on nothing."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    records = [json.loads(x) for x in open(d / "train.jsonl")]
    records[0]["messages"][0]["content"] = [{"type": "image"}, {"type": "text", "text": records[0]["messages"][0]["content"]}]
    records[1]["messages"] = records[1]["messages"][1:]  # no user turn
    records[2]["messages"][0]["content"] = 7
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "val.jsonl").write_text(open(d / "val.jsonl").read() + json.dumps({"images": [], "messages": []}) + "\n")
    loaded = D.load_split(str(d), "train")
    assert len(loaded) == len(records) - 2 and loaded[0]["messages"][0]["content"] == records[0]["messages"][0]["content"][1]["text"]
    assert "skipped 2 malformed records" in capsys.readouterr().err
    assert train.main(tiny(tokenizer_dir, str(d), tmp_path / "a", "--pretrain_steps", "2", "--max_steps", "2")) == 0
    for name in os.listdir(d / "images"):  # now no image can be read
        (d / "images" / name).write_bytes(b"broken")
    r = run(tiny(tokenizer_dir, str(d), tmp_path / "b", "--pretrain_steps", "0", "--max_steps", "3"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "done" not in r.stdout, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and errors[0].startswith("error:") and "none usable" in errors[0], r.stderr[-2000:]


def test_bad_paths_are_one_line(tmp_path, tokenizer_dir, data):
    """--out_dir a file, or under one; --lm a text file named .gguf; --tokenizer an empty dir: one
    line, exit 2, nothing written."""
    (tmp_path / "file").write_text("precious")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    (tmp_path / "empty").mkdir()
    for flags in (["--out_dir", str(tmp_path / "file")], ["--out_dir", str(tmp_path / "file" / "out")],
                  ["--lm", str(tmp_path / "fake.gguf"), "--tokenizer", tokenizer_dir],
                  ["--tokenizer", str(tmp_path / "empty")]):
        r = run(tiny(tokenizer_dir, data, tmp_path / "out", "--max_steps", "1") + flags)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, (flags, r.stderr)
    assert (tmp_path / "file").read_text() == "precious"


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, tokenizer_dir, data, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train.main(tiny(tokenizer_dir, data, out, "--pretrain_steps", "0", "--max_steps", "1")) == 0
    fsync, calls = os.fsync, []

    def full(fd):  # the disk fills while the new best/ is written
        calls.append(fd)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    assert train.main(["--resume", "--out_dir", str(out), "--max_steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "No space left on device" in err[-1]
    assert not [f for f in os.listdir(out) if "tmp" in f] and not [f for f in os.listdir(out / "best") if "tmp" in f]
    monkeypatch.setattr(os, "fsync", fsync)
    assert M.VLM.from_pretrained(out / "best") is not None and checkpoint.read_state(str(out)) is not None


class Scripted(torch.nn.Module):
    """A stand-in model whose answers are set by hand: teacher-forced logits that pick the given
    tokens, and generate() returning the given token ids."""

    def __init__(self, picks=None, answers=None):
        super().__init__()
        self.picks, self.answers = picks, answers

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        keep = labels[:, 1:] != -100
        logits = F.one_hot(self.picks[keep], 300).float() * 10
        return logits, F.cross_entropy(logits, labels[:, 1:][keep])

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kw):
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(a) for a in self.answers[:len(input_ids)]], True, 2)


def test_metrics_on_hand_made_predictions(tokenizer):
    """evaluate(): a sample is right only when every answer token is; final_evaluation(): the
    greedy answer against the reference (up to case, spaces and a final period), mean over types."""
    import types
    from contextlib import nullcontext
    from evaluation import final_evaluation
    labels = torch.full((3, 6), -100)
    labels[:, 3:] = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 10]])
    picks = labels[:, 1:].clone()
    picks[1, 3] = 4  # sample 1 gets its last answer token wrong
    batch = {"input_ids": torch.zeros(3, 6, dtype=torch.long), "labels": labels, "types": ["a", "a", "b"]}
    run_ = types.SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext())
    result = train.evaluate(Scripted(picks=picks), [batch], run_)
    assert result["per_type"] == {"a": 0.5, "b": 1.0} and result["accuracy"] == 0.75
    proc = M.Processor(tokenizer, 32, 4)
    records = [{"images": [], "type": t, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for t, q, a in (("a", "What colour is it?", "Red"), ("a", "How many?", "3"), ("b", "Which word?", "cat"))]
    said = ["red.", "three", "The cat"]  # right (case, period), wrong, wrong; sorted by question as evaluated
    order = sorted(range(3), key=lambda i: str(records[i]["messages"][:-1]))
    vlm = Scripted(answers=[tokenizer.encode(said[i], add_special_tokens=False) + [tokenizer.eos_token_id] for i in order])
    result = final_evaluation(vlm, proc, records, torch.device("cpu"))
    assert result["per_type"] == {"a": 0.5, "b": 0.0} and result["accuracy"] == 0.25 and result["n"] == 3


def test_mixed_precision_steps_match_fp32(tmp_path, tokenizer_dir, data):
    """bf16 autocast, and fp16 autocast with GradScaler (its gradients unscaled before clipping), take
    the VLM steps fp32 takes: bf16's losses within 2e-3 (of ~10.5) and gradient norms within 1%."""
    logs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        args = tiny(tokenizer_dir, data, tmp_path / dtype, "--pretrain_steps", "0", "--max_steps", "4", "--num_workers", "0")
        assert train.main(args[:args.index("--dtype") + 1] + [dtype] + args[args.index("--dtype") + 2:]) == 0
        logs[dtype] = log(tmp_path / dtype)
    for a, b in zip(logs["fp32"], logs["bf16"]):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 and abs(a["grad_norm"] / b["grad_norm"] - 1) <= 0.01, (a, b)
    # fp16: GradScaler skips a step whose scaled gradients overflow (grad_norm null; at its first
    # scale of 2^16 that can be any early step), after which the runs part: the first loss (before
    # any update) within 2e-3, steps before a skip as bf16's, and every step taken with a gradient
    # norm within 100x of fp32's at that step (the runs have parted; a gradient GradScaler left
    # scaled would be 2^16 times larger)
    fp16 = logs["fp16"]
    assert abs(fp16[0]["loss"] - logs["fp32"][0]["loss"]) <= 2e-3
    pairs = list(zip(logs["fp32"], fp16))
    before_skip = pairs[:next((i for i, (_, b) in enumerate(pairs) if b["grad_norm"] is None), len(pairs))]
    assert all(abs(a["loss"] - b["loss"]) <= 2e-3 and abs(a["grad_norm"] / b["grad_norm"] - 1) <= 0.01
               for a, b in before_skip), fp16
    taken = [(a, b) for a, b in pairs if b["grad_norm"] is not None]
    assert len(taken) >= 2 and all(0.01 <= a["grad_norm"] / b["grad_norm"] <= 100 for a, b in taken), fp16


def test_init_from_trains_only_what_is_asked(tmp_path, tokenizer_dir, data):
    """--init_from starts from a checkpoint's weights; --lr_vision 0 leaves the ViT bit-identical;
    --lm_train_layers 1 changes the LM's top block and final norm only; --packing trains too."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(tiny(tokenizer_dir, data, first, "--pretrain_steps", "0", "--max_steps", "2")) == 0
    assert train.main(["--config", "tiny", "--init_from", str(first), "--data_dir", data, "--out_dir", str(second),
                       "--pretrain_steps", "0", "--max_steps", "2",
                       "--lr_vision", "0", "--lm_train_layers", "1", "--packing", "--dtype", "fp32",
                       "--final_eval", "false", "--num_workers", "0", "--batch_size", "8", "--eval_interval", "0"]) == 0
    a, b = checkpoint.read_safetensors(str(first)), checkpoint.read_safetensors(str(second))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("projector.", "lm.blocks.1.", "lm.norm.")) for k in changed), changed
    assert any(k.startswith("lm.blocks.1.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert all(x["loss"] is not None and x["tokens_per_s"] > 0 for x in log(second))
