"""The worked examples of docs/hacking.md: a custom loss trained by train.py --model_class
(examples/contrastive.py), and transformers' SmolVLM changed the way picoVLM's
lm_image_attention="bidirectional" is (examples/smolvlm_bidirectional.py)."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
import train
from conftest import max_diff, random_image, script

CONTRASTIVE = "examples/contrastive.py:ContrastiveVLM"


def tiny(tokenizer_dir, data, out_dir, *args):
    return ["--config", "tiny", "--tokenizer", tokenizer_dir, "--data_dir", data, "--out_dir", str(out_dir),
            "--dtype", "fp32", "--final_eval", "false", "--pretrain_steps", "0", *args]


# ----------------------------------------------------------------------------- 1. a custom loss

def test_contrastive_term_is_the_siglip_loss_per_answer_token(tokenizer_dir, data):
    """ContrastiveVLM's loss = the VLM's + weight * (sigmoid loss summed over the batch's image-answer
    pairs) / answer tokens, computed here sample by sample (1e-5); the same with packed rows; the
    term's gradient reaches the projector; in eval mode the loss is the VLM's alone."""
    torch.manual_seed(0)
    ours, processor = train.build_model(train.make_config("tiny", {"tokenizer": tokenizer_dir,
                                                                   "model_class": CONTRASTIVE}))
    assert type(ours).__name__ == "ContrastiveVLM" and isinstance(ours, M.VLM)
    plain = M.VLM(ours.cfg, vision=ours.vision, lm=ours.lm, projector=ours.projector)  # the same weights
    dataset = D.ChatDataset(D.load_split(data, "train"), processor, 2048)
    samples = [dataset[i] for i in range(8)]
    assert all(len(s[2]) == 1 for s in samples)  # one image (tile) a sample
    batch = D.collate(samples)

    def loss_and_grad(model, b):
        model.zero_grad()
        loss = model(b["input_ids"], b["pixel_values"], b.get("attention_mask"), b["labels"])[1]
        loss.backward()
        return loss.item(), model.projector.proj.weight.grad.clone()
    got, grad = loss_and_grad(ours, batch)
    lm_only, lm_grad = loss_and_grad(plain, batch)
    with torch.no_grad():  # each sample: its one image's mean token, its answer tokens' mean embedding
        img = F.normalize(torch.stack([ours.image_embeds(s[2][0][None])[0].mean(0) for s in samples]), dim=-1)
        txt = F.normalize(torch.stack([ours.lm.tok_embed(s[1][s[1] != -100]).mean(0) for s in samples]), dim=-1)
        z = 2 * torch.eye(len(samples)) - 1
        pairs = -F.logsigmoid(z * (ours.t * img @ txt.T + ours.b)).sum()
    assert abs(got - (lm_only + ours.weight * pairs.item() / batch["supervised"])) <= 1e-5
    assert got - lm_only > 0.05 and max_diff(grad, lm_grad) > 1e-3
    assert abs(loss_and_grad(ours, D.collate(samples, pack_len=10_000))[0] - got) <= 1e-5
    ours.eval()
    with torch.no_grad():
        assert ours(batch["input_ids"], batch["pixel_values"], None, batch["labels"])[1].item() == pytest.approx(
            lm_only, abs=1e-6)


def test_train_py_trains_a_model_class_and_saves_a_plain_picovlm(tmp_path, tokenizer_dir, data):
    """--model_class: 3 steps of train.py; step 1's loss is the plain VLM's (same seed, same batch)
    plus the positive contrastive term; 1 step + --resume gives the same losses (the resumed run
    rebuilds the subclass); the checkpoint is a plain picoVLM, and --init_from with --model_class
    builds the subclass from it."""
    out, split, plain = tmp_path / "out", tmp_path / "split", tmp_path / "plain"
    for args in (tiny(tokenizer_dir, data, out, "--max_steps", "3", "--model_class", CONTRASTIVE),
                 tiny(tokenizer_dir, data, split, "--max_steps", "1", "--lr_decay_steps", "3",
                      "--model_class", CONTRASTIVE),
                 ["--resume", "--out_dir", split, "--max_steps", "3"],
                 tiny(tokenizer_dir, data, plain, "--max_steps", "1", "--eval_interval", "0")):
        r = script("train.py", *args)
        assert r.returncode == 0, r.stderr[-3000:]

    def losses(path):
        return [json.loads(line)["loss"] for line in open(path / "log.jsonl")]
    assert len(losses(out)) == 3 and losses(split) == losses(out)
    assert losses(out)[0] > losses(plain)[0] + 0.05
    vlm = M.VLM.from_pretrained(out)
    assert type(vlm) is M.VLM and json.load(open(out / "config.json"))["model_type"] == "picovlm"
    again = train.build_model(train.make_config("tiny", {"init_from": str(out), "model_class": CONTRASTIVE}))[0]
    assert type(again).__name__ == "ContrastiveVLM"
    assert all(torch.equal(a, b) for a, b in zip(vlm.state_dict().values(), again.state_dict().values()))


def test_a_bad_model_class_is_one_line(tmp_path, tokenizer_dir, data, capsys):
    (tmp_path / "notavlm.py").write_text("import torch\n\n\nclass NotAVLM(torch.nn.Module):\n    pass\n")
    for spec in (str(tmp_path / "missing.py:ContrastiveVLM"), "examples/contrastive.py", "examples/contrastive.py:Nope",
                 f"{tmp_path / 'notavlm.py'}:NotAVLM"):
        assert train.main(tiny(tokenizer_dir, data, tmp_path / "out", "--max_steps", "1", "--model_class", spec)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --model_class") and err.strip().count("\n") == 0, (spec, err)


# ----------------------------------------------------------------------------- 2. transformers' SmolVLM, changed

@pytest.fixture(scope="module")
def bidirectional_pair(tmp_path_factory, tokenizer):
    """picoVLM with lm_image_attention="bidirectional" and BidirectionalSmolVLM on the same weights
    (exported from the causal twin: the weights are the same, and stock SmolVLM is causal), plus
    stock SmolVLM on them."""
    from transformers.models.smolvlm import SmolVLMForConditionalGeneration

    from examples.smolvlm_bidirectional import BidirectionalSmolVLM
    processor = M.Processor(tokenizer, 32, 4)
    lm = dataclasses.replace(M.LM_PRESETS["tiny"], lm_vocab=len(tokenizer), lm_max_positions=256)
    cfg = M.VLMConfig(vision=M.VISION_PRESETS["tiny"], lm=lm, image_token_id=processor.image_token_id)
    torch.manual_seed(0)
    causal = M.VLM(cfg).eval()
    path = tmp_path_factory.mktemp("smolvlm")
    causal.save_pretrained(path, format="smolvlm")
    ours = M.VLM(dataclasses.replace(cfg, lm_image_attention="bidirectional")).eval()
    ours.load_state_dict(causal.state_dict())
    return (processor, ours, BidirectionalSmolVLM.from_pretrained(path).eval(),  # sdpa, transformers' default
            BidirectionalSmolVLM.from_pretrained(path, attn_implementation="eager").eval(),
            SmolVLMForConditionalGeneration.from_pretrained(path).eval())


def test_smolvlm_subclass_equals_picovlm_bidirectional(bidirectional_pair):
    """Max abs logits difference <= 1e-4 (fp32; sdpa's bool mask and eager's additive one) on a
    two-image prompt and on a left-padded batch (two images, then one; real positions; position ids
    as generate() makes them), where stock SmolVLM differs by > 1e-2; greedy generation gives the
    same tokens."""
    processor, ours, hf, eager, stock = bidirectional_pair
    images = [random_image(50, 40, 1), random_image(30, 60, 2)]
    one = processor([processor.chat_prompt("Compare the two pictures.", 2)], [images])
    two = processor([processor.chat_prompt("Compare the two pictures.", 2), processor.chat_prompt("What is it?", 1)],
                    [images, [random_image(40, 40, 3)]])
    pixels = torch.zeros(2, 2, 3, 32, 32)  # transformers: [B, images, 3, H, W]; an all-zero image is padding
    pixels[0], pixels[1, 0] = two["pixel_values"][:2], two["pixel_values"][2]
    mask = two["attention_mask"]
    assert (mask == 0).any()
    hf_inputs = [dict(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                      pixel_values=one["pixel_values"][None]),
                 dict(input_ids=two["input_ids"], attention_mask=mask, pixel_values=pixels,
                      position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))]
    with torch.no_grad():
        for b, kw in zip((one, two), hf_inputs):
            want = ours(b["input_ids"], b["pixel_values"], b["attention_mask"])[0]
            real = b["attention_mask"].bool()
            assert max_diff(hf(**kw).logits[real], want[real]) <= 1e-4
            assert max_diff(eager(**kw).logits[real], want[real]) <= 1e-4
            assert max_diff(stock(**kw).logits[real], want[real]) > 1e-2
        want = ours.generate(two["input_ids"], two["pixel_values"], mask, max_new_tokens=6, eos_token_id=-1)
        got = hf.generate(**{k: v for k, v in hf_inputs[1].items() if k != "position_ids"}, max_new_tokens=6,
                          min_new_tokens=6, do_sample=False, eos_token_id=None)[:, mask.shape[1]:]
    assert got.tolist() == want.tolist()
