"""Stage 1 of the demo (train.py --pretrain_steps N): the ViT and the projector learn without the
135M-parameter LM, through two cheap losses, so that the ViT sees far more images than the VLM
stage could show it in the same time.

- a word head: each image token is compared (cosine, learned scale) with the LM's own, frozen
  input embeddings of the training vocabulary, and an image's tokens must name the words of its
  answers (a multi-label target, as CatLIP pre-trains a ViT on the words of captions). The
  projector so learns to write image tokens that look to the LM like the words it will have to
  say, and the VLM stage starts from an aligned projector instead of a random one;
- a tiny decoder that answers the questions from the image tokens (through a linear adapter to
  its width): questions about relations (left of, bigger than) need more than words.

The generic data path (data.py) knows nothing of this: collate() here wraps data.collate.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from data import collate as plain_collate


class Proxy(M.VLM):
    """Stage 1's model. It shares the VLM's ViT and projector (training it trains them)."""

    def __init__(self, cfg, vlm, words):
        super().__init__(cfg, vision=vlm.vision, projector=vlm.projector)
        self.adapter = nn.Linear(vlm.cfg.lm.lm_hidden, cfg.lm.lm_hidden, bias=False)
        self.register_buffer("words", F.normalize(words.float(), dim=-1), persistent=False)
        self.word_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # a learned temperature, as in CLIP
        self.word_logits = None

    def image_embeds(self, pixel_values):
        tokens = super().image_embeds(pixel_values)  # [images, k, LM width]
        # "some token of the image is this word": a soft maximum over the image's k tokens
        cosine = F.normalize(tokens.float(), dim=-1) @ self.words.T
        self.word_logits = torch.logsumexp(self.word_scale.exp() * cosine, dim=1)
        return self.adapter(tokens)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_words=None):
        logits, loss = super().forward(input_ids, pixel_values, attention_mask, labels)
        if image_words is not None and len(image_words):
            # soft-target cross-entropy, normalised like the decoder's loss (by the answer tokens),
            # so that accumulation and DDP still give exactly the gradient of one large batch
            words = F.cross_entropy(self.word_logits, image_words, reduction="sum")
            loss = loss + words / (labels[:, 1:] != -100).sum()
        return logits, loss


def build_proxy(vlm, cfg, vocab):
    """Stage 1's model (Proxy) around the VLM's ViT and projector. Its decoder knows only `vocab`,
    the token ids of the training texts (compact ids 1..n; 0 = any other token): a 49k-word output
    layer would cost more than the ViT. -> (proxy, remap), remap[token id] = compact id."""
    remap = torch.zeros(vlm.cfg.lm.lm_vocab, dtype=torch.long)
    remap[torch.tensor(vocab)] = torch.arange(1, len(vocab) + 1)
    heads = max(1, cfg.proxy_width // 64)
    lm_cfg = M.LanguageConfig(lm_hidden=cfg.proxy_width, lm_layers=cfg.proxy_layers, lm_heads=heads, lm_kv_heads=heads,
                              lm_intermediate=4 * cfg.proxy_width, lm_vocab=len(vocab) + 1, lm_max_positions=cfg.seq_len)
    embeddings = vlm.lm.tok_embed.weight.detach()
    words = torch.cat([torch.zeros_like(embeddings[:1]), embeddings[torch.tensor(vocab)]])  # compact id 0: no word
    proxy = Proxy(dataclasses.replace(vlm.cfg, lm=lm_cfg, image_token_id=int(remap[vlm.cfg.image_token_id])),
                  vlm, words)
    return proxy, remap


def proxy_vocab(dataset):
    """Token ids of the training texts: every message (batch-tokenized: fast) plus one encoded
    sample for the tokens of the chat template and the image prompt."""
    tokenizer = dataset.processor.tokenizer
    texts = [m["content"] for r in dataset.records for m in r["messages"] if isinstance(m.get("content"), str)]
    ids = {t for seq in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in seq}
    sample = next((s for s in map(dataset.__getitem__, range(min(len(dataset), 16))) if s is not None), None)
    if sample is not None:
        ids |= set(sample[0].tolist())
    return sorted(ids | {dataset.processor.image_token_id})


def collate(samples, remap, pack_len=0, words=True):
    """data.collate in the compact vocabulary, plus (words=True; validation scores the decoder
    alone) the word head's target: for each image, the words of its sample's answers, sharing a
    weight equal to the number of answer tokens (so that the word loss weighs like the decoder's)."""
    batch = plain_collate(samples, pack_len)
    labels = batch["labels"]
    batch["input_ids"] = remap[batch["input_ids"]]
    batch["labels"] = torch.where(labels == -100, -100, remap[labels.clamp(min=0)])
    if not words:
        return batch
    good = [s for s in samples if s is not None]
    targets = torch.zeros(sum(len(s[2]) for s in good), int(remap.max()) + 1)
    tile = 0
    for _, lab, tiles, _ in good:
        answer = remap[lab[lab != -100]]
        kinds = answer[answer > 0].unique()
        targets[tile:tile + len(tiles), kinds] = len(answer) / max(1, len(kinds))
        tile += len(tiles)
    batch["image_words"] = targets
    return batch
