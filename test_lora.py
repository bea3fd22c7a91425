"""LoRA, gradient checkpointing and bench.py --memory: adapters that change nothing when new, merge
exactly, train alone, load in PEFT; checkpointing that changes no gradient; train.py with LoRA
resuming bit for bit and under DDP. CPU, no network; tiny random models."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import model as M
import train
from checkpoint import UserError
from conftest import ENV, HERE, max_diff, script, tiny_vlm


def batch(vlm, rows=2, length=24, seed=0):
    """Token ids with one image's tokens each, pixels and labels on the last 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    n = vlm.cfg.image_tokens
    ids = torch.randint(0, vlm.cfg.image_token_id - 1, (rows, length), generator=g)
    ids[:, 2:2 + n] = vlm.cfg.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    s = vlm.cfg.vision.vit_image_size
    return ids, torch.randn(rows, 3, s, s, generator=g), labels


def logits(vlm, ids, pixels):
    vlm.eval()
    with torch.no_grad():
        return vlm(ids, pixels)[0]


def test_adapters_start_at_zero_train_alone_and_merge_exactly():
    """A new adapter changes no logit; training moves the adapters and the requested trainable part
    only (gradients, optimizer state); merged logits equal unmerged ones (<= 1e-5); merging leaves
    every other weight bit-identical and moves each projection by a matrix of rank <= r."""
    torch.manual_seed(0)
    vlm = tiny_vlm()
    base = {k: v.clone() for k, v in vlm.state_dict().items()}
    ids, pixels, labels = batch(vlm)
    before = logits(vlm, ids, pixels)
    vlm.add_lora(rank=2, alpha=4, dropout=0.1, targets=("lm", "vision"), trainable=("projector",))
    assert torch.equal(logits(vlm, ids, pixels), before)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vlm.named_parameters() if ".lora_" in n or n.startswith("projector.")}
    assert {n.split(".lora_")[0] for n in trainable if ".lora_" in n} == {n for n, _ in M.lora_modules(vlm)}
    assert "lm.lm_head" not in dict(M.lora_modules(vlm)) and len(M.lora_modules(vlm)) == 2 * 5 + 2 * 4
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    vlm.train()
    for _ in range(3):
        vlm(ids, pixels, labels=labels)[1].backward()
        assert {n for n, p in vlm.named_parameters() if p.grad is not None} == trainable
        opt.step()
        opt.zero_grad(set_to_none=True)
    named = {id(p): n for n, p in vlm.named_parameters()}
    assert {named[id(p)] for p in opt.state} == trainable
    unmerged = logits(vlm, ids, pixels)
    assert max_diff(unmerged, before) > 1e-3  # the adapters did learn something
    saved = M.merged_state_dict(vlm)
    projector = vlm.projector.proj.weight.detach().clone()
    vlm.merge_lora()
    assert vlm.lora is None and not M.lora_modules(vlm)
    assert max_diff(logits(vlm, ids, pixels), unmerged) <= 1e-5
    state = vlm.state_dict()
    assert state.keys() == base.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    sizes = {"lm": vlm.lm.blocks[0].attn.qkv_sizes, "vision": vlm.vision.blocks[0].attn.qkv_sizes}
    for k in state:
        if k.startswith("projector."):
            assert torch.equal(state[k], projector)
        elif k.endswith(("qkv.weight", "proj.weight", "gate.weight", "up.weight", "down.weight", "fc1.weight",
                         "fc2.weight")) and k != "projector.proj.weight":
            deltas = (state[k] - base[k]).split(sizes[k.split(".")[0]] if ".qkv." in k else len(state[k]))
            assert all(torch.linalg.matrix_rank(d) <= 2 for d in deltas) and (state[k] != base[k]).any(), k
        else:  # embeddings, norms, biases, positions: untouched
            assert torch.equal(state[k], base[k]), k


def test_bad_lora_settings_are_one_line():
    vlm = tiny_vlm()
    for kw in ({"targets": ("decoder",)}, {"targets": ()}, {"rank": 0}, {"trainable": ("lm",)},
               {"targets": ("lm", "projector"), "trainable": ("projector",)}, {"dropout": 1.0}):
        with pytest.raises(UserError, match="add_lora"):
            vlm.add_lora(**kw)
    with pytest.raises(UserError, match="no adapters"):
        vlm.save_lora("unused")
    vlm.add_lora()
    with pytest.raises(UserError, match="adapters already"):
        vlm.add_lora()


# ----------------------------------------------------------------------------- PEFT

def tiny_smolvlm(path, tie):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    cfg = SmolVLMConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=64, patch_size=16),
                        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         tie_word_embeddings=tie),
                        scale_factor=2, image_token_id=299, tie_word_embeddings=tie)
    SmolVLMForConditionalGeneration(cfg).save_pretrained(path)
    return SmolVLMForConditionalGeneration


@pytest.mark.parametrize("targets,trainable,tie", [(("lm",), ("projector",), True),
                                                    (("lm", "vision", "projector"), (), False)])
def test_peft_loads_our_adapters_and_we_load_peft_s(tmp_path, targets, trainable, tie):
    """transformers' tiny SmolVLM -> ours; random adapters (and projector) -> save_lora ->
    PeftModel.from_pretrained on transformers' model: our logits (<= 1e-4). PEFT's own save of it
    loads back into ours (load_lora) with the same logits, and our merged SmolVLM export gives them
    too. A wrong-shape adapter, or one on a model with adapters, is one line."""
    from peft import PeftModel
    Model = tiny_smolvlm(tmp_path / "hf", tie)
    vlm = M.VLM.from_pretrained(tmp_path / "hf").add_lora(rank=4, alpha=8, targets=targets, trainable=trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (p for p in vlm.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.1)
    vlm.save_lora(tmp_path / "adapter")
    ids, pixels, _ = batch(vlm, rows=1, length=30)
    ours = logits(vlm, ids, pixels)
    peft = PeftModel.from_pretrained(Model.from_pretrained(tmp_path / "hf"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids, pixel_values=pixels[:, None]).logits
        assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(ours, logits(M.VLM.from_pretrained(tmp_path / "hf"), ids, pixels)) > 1e-2  # the adapters count
    peft.save_pretrained(tmp_path / "peft")
    again = M.VLM.from_pretrained(tmp_path / "hf").load_lora(tmp_path / "peft")
    assert again.lora["targets"] == targets and again.lora["trainable"] == trainable
    assert max_diff(logits(again, ids, pixels), ours) <= 1e-5
    vlm.save_pretrained(tmp_path / "merged", format="smolvlm")
    with torch.no_grad():
        merged = Model.from_pretrained(tmp_path / "merged").eval()(input_ids=ids, pixel_values=pixels[:, None]).logits
    assert max_diff(merged, theirs) <= 1e-4
    with pytest.raises(UserError, match="adapters already"):
        again.load_lora(tmp_path / "peft")
    other = tiny_vlm()  # the same layer names, other widths
    with pytest.raises(UserError, match="has shape") as e:
        other.load_lora(tmp_path / "adapter")
    assert "\n" not in str(e.value)


def test_peft_s_adapter_on_some_projections_loads(tmp_path):
    """An adapter made by PEFT itself with the LoRA paper's target_modules=["q_proj", "v_proj"]
    (which also match the vision tower's) loads into ours: PEFT's logits (<= 1e-4); the other
    linears keep a zero update."""
    from peft import LoraConfig, get_peft_model
    Model = tiny_smolvlm(tmp_path / "hf", tie=True)
    torch.manual_seed(2)
    peft = get_peft_model(Model.from_pretrained(tmp_path / "hf"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    peft.save_pretrained(tmp_path / "peft")
    vlm = M.VLM.from_pretrained(tmp_path / "hf").load_lora(tmp_path / "peft")
    assert vlm.lora["targets"] == ("lm", "vision") and vlm.lora["trainable"] == ()
    ids, pixels, _ = batch(vlm, rows=1, length=30)
    with torch.no_grad():
        theirs = peft(input_ids=ids, pixel_values=pixels[:, None]).logits
    assert max_diff(logits(vlm, ids, pixels), theirs) <= 1e-4
    qkv = vlm.lm.blocks[0].attn.qkv
    assert qkv.lora_B[1].abs().sum() == 0 and qkv.lora_B[0].abs().sum() > 0  # k: none in the file
    checkpoint.atomic_save_safetensors({"base_model.model.lm_head.weight": torch.zeros(1)},
                                       str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="no LoRA weights"):
        tiny_vlm().load_lora(tmp_path / "peft")


# ----------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("amp", [False, True])
def test_grad_checkpointing_gives_the_same_losses_and_gradients(amp):
    """The ViT and LM blocks recomputed in the backward: the same loss and gradients (<= 1e-6 in
    fp32; bf16 autocast too), with LoRA adapters and their dropout as well; the forward keeps under
    a third of the activations."""
    def grads(vlm, on):
        vlm.train().set_grad_checkpointing(on)
        vlm.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = vlm(ids, pixels, labels=labels)[1]
        loss.backward()
        saved[on] = sum(kept)
        return loss.item(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    vlm = tiny_vlm()
    ids, pixels, labels = batch(vlm)
    saved = {}
    for lora in (False, True):
        if lora:
            vlm.add_lora(rank=2, dropout=0.2, targets=("lm", "vision"), trainable=("projector",))
            with torch.no_grad():
                for _, m in M.lora_modules(vlm):
                    for b in m.lora_B:
                        b.normal_()
        (a, ga), (b, gb) = grads(vlm, False), grads(vlm, True)
        assert abs(a - b) <= 1e-6 and ga.keys() == gb.keys()
        assert any(k.startswith("vision.blocks") for k in ga) and any(k.startswith("lm.blocks") for k in ga)
        assert max(max_diff(ga[k], gb[k]) for k in ga) <= 1e-6 and saved[True] < saved[False] / 3


# ----------------------------------------------------------------------------- train.py

def tiny(tokenizer_dir, data, out_dir, *args):
    return ["--config", "tiny", "--tokenizer", tokenizer_dir, "--data_dir", data, "--out_dir", str(out_dir),
            "--dtype", "fp32", "--final_eval", "false", "--num_workers", "0", *args]


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_lora_flags_that_cannot_work_are_one_line():
    for explicit, message in (({"lora_targets": "lm"}, "--lora_targets is ignored without --lora_rank"),
                              ({"lora_rank": 4, "lm_train_layers": 2}, "choose one"),
                              ({"lora_rank": 4, "lr_lm": 0.0}, "--lora_targets lm with --lr_lm 0"),
                              ({"lora_rank": 4, "lora_targets": "vision"}, "trains through adapters"),
                              ({"lora_rank": 4, "lora_targets": "lm,decoder"}, "--lora_targets 'lm,decoder'"),
                              ({"lora_rank": -1}, "--lora_rank -1"), ({"lora_rank": 4, "lora_dropout": 1.0}, "dropout")):
        with pytest.raises(UserError, match=message):
            train.make_config("tiny", explicit)
    assert train.make_config("tiny", {"lora_rank": 4, "lora_targets": "lm,projector"}).lora_rank == 4
    assert train.make_config("default", {"lora_rank": 8}).lm_train_layers == 0  # the demo preset's 4 gives way


def test_lora_run_resumes_exactly_and_out_dir_holds_the_merged_model(tmp_path, tokenizer_dir, data, capsys):
    """7 steps straight == 2 steps, --resume, 5 more (adapters with dropout, checkpointing, image
    shifts, a fully trained projector): identical losses bit for bit, the same merged model and
    adapter files. out_dir's model is base/ with adapter/ merged in (<= 1e-5); --lora_rank cannot
    change on --resume; the final evaluation runs on the merged model."""
    args = ("--pretrain_steps", "2", "--lr_decay_steps", "7", "--augment_shift", "2", "--lora_rank", "4",
            "--lora_dropout", "0.1", "--grad_checkpointing", "--eval_interval", "3", "--lr_vision", "0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(tiny(tokenizer_dir, data, straight, *args, "--max_steps", "7", "--final_eval", "true")) == 0
    assert "LoRA rank 4 on lm" in capsys.readouterr().out
    assert train.main(tiny(tokenizer_dir, data, split, *args, "--max_steps", "2")) == 0
    assert train.main(["--resume", "--out_dir", str(split), "--max_steps", "7", "--lora_rank", "8"]) == 2
    assert "--lora_rank cannot change on --resume" in capsys.readouterr().err
    assert train.main(["--resume", "--out_dir", str(split), "--max_steps", "7", "--final_eval", "true"]) == 0
    assert losses(straight) == losses(split) and len(losses(split)) == 9
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (straight / name).read_bytes() == (split / name).read_bytes(), name
    assert json.loads((straight / "final_eval.json").read_text())["n"] == 14
    config = json.loads((split / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"] == ["connector"] and "text_model" in config["target_modules"]
    merged, base = M.VLM.from_pretrained(split), M.VLM.from_pretrained(split / "base").load_lora(split / "adapter")
    ids, pixels, _ = batch(merged)
    assert max_diff(logits(merged, ids, pixels), logits(base, ids, pixels)) <= 1e-5
    meta, tensors = checkpoint.read_state(split)  # the adapters and the projector, not the frozen base
    assert {k.split("/", 1)[1].split(".")[0] for k in tensors if k.startswith("param/")} == {"lm", "projector"}
    assert all(".lora_" in k for k in tensors if k.startswith("param/lm."))


def test_lora_two_gloo_processes_equal_one(tmp_path, tokenizer_dir, data):
    """LoRA under DDP: 2 gloo processes x batch 4 == 1 process x 2 accumulated micro-batches of 4:
    losses and gradient norms within 1e-5."""
    common = ("--pretrain_steps", "0", "--max_steps", "3", "--lora_rank", "4", "--lora_targets", "lm,vision",
              "--batch_size", "4")
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"),
                        *tiny(tokenizer_dir, data, tmp_path / "one", *common, "--grad_accum", "2")],
                       capture_output=True, text=True, cwd=HERE, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(HERE, "train.py"), *tiny(tokenizer_dir, data, tmp_path / "two", *common)],
                       capture_output=True, text=True, cwd=HERE, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "two"))
    assert len(a) == len(b) == 3
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5
    assert max(abs(x["grad_norm"] / y["grad_norm"] - 1) for x, y in zip(a, b)) <= 1e-5


def test_bench_memory_smoke_prints_the_json_line():
    r = script("bench.py", "--memory", "--smoke", timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and not result["failed"]
    for key in ("peak_full_gib", "peak_frozen_vision_gib", "peak_lora_gib", "peak_lora_ckpt_gib"):
        assert 0 < result[key] < 4, key
    assert "tiny batch 4" in result["memory_gib"]
