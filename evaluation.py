"""Evaluation of a VLM's greedy answers: exact match per question type on a JSONL split (the
synthetic set's test split, or any dataset in prepare_data.py's format).
"""
from contextlib import nullcontext

import torch

from checkpoint import UserError
from processor import load_image


def normalize(text):
    """Exact match up to case, whitespace and a final period."""
    return " ".join(text.lower().split()).rstrip(".")


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def final_evaluation(vlm, processor, records, device, autocast=nullcontext(), batch_size=64):
    """Greedy-decode the answer to each record's last question and compare it with the reference
    (normalize()). -> accuracy (the mean over types, each type counting the same), per type."""
    vlm.eval()
    tok, stop = processor.tokenizer, processor.stop_ids
    # the same questions in one batch: a batch decodes until its longest answer is done, so long
    # answers (captions) are best kept together (docs/experiments.md: about half the time)
    records = sorted(records, key=lambda r: str(r["messages"][:-1]))
    max_new = max(len(tok.encode(r["messages"][-1]["content"], add_special_tokens=False)) for r in records) + 2
    right, unreadable = {}, 0
    for i in range(0, len(records), batch_size):
        prompts, images, kept = [], [], []
        for r in records[i:i + batch_size]:
            try:
                imgs = [load_image(p) for p in r["images"]]
            except UserError:
                unreadable += 1
                continue
            prompts.append(processor.chat_prompt(r["messages"][:-1], len(imgs)))
            images.append(imgs)
            kept.append(r)
        if not kept:
            continue
        batch = {k: v.to(device) for k, v in processor(prompts, images).items() if v is not None}
        # compiled blocks run eagerly here: compiling the cached decoding path (new shapes for the
        # prefill and the one-token steps) costs more than it saves in one pass over the test split
        with autocast, torch.compiler.set_stance("force_eager"):
            out = vlm.generate(**batch, max_new_tokens=max_new, eos_token_id=stop)
        for r, ids in zip(kept, out.tolist()):
            answer = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True)
            right.setdefault(r.get("type", ""), []).append(normalize(answer) == normalize(r["messages"][-1]["content"]))
    per_type = {t: sum(v) / len(v) for t, v in sorted(right.items())}
    return {"accuracy": mean(per_type.values()), "per_type": per_type, "n": sum(map(len, right.values())),
            "unreadable_images": unreadable}
