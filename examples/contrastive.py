"""A custom loss without touching the trainer (docs/hacking.md, example 1): picoVLM plus a
SigLIP-style image-text loss. Train it with

    python train.py --config tiny --model_class examples/contrastive.py:ContrastiveVLM --out_dir out-contrastive

Each sample's image (the mean of its projector tokens) and its answer (the mean of the LM's input
embeddings of its supervised tokens) form a positive pair, every other pairing in the micro-batch a
negative one: sigmoid loss -log sigmoid(z * (t * cos + b)), z = +1 / -1, summed over all pairs.
t and b stay at SigLIP's initial values (10, -10) instead of being learned, so the model has no new
parameters: its checkpoint is a plain picoVLM that generate.py and model.VLM.from_pretrained load.
"""
import torch
import torch.nn.functional as F

import model as M


class ContrastiveVLM(M.VLM):
    weight, t, b = 0.1, 10.0, -10.0  # the term's weight; SigLIP's temperature and bias, fixed

    def image_embeds(self, pixel_values):
        self._images = super().image_embeds(pixel_values)  # [images, tokens, LM width], kept for forward
        return self._images

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        self._images = None
        logits, loss = super().forward(input_ids, pixel_values, attention_mask, labels)
        images, self._images = self._images, None
        if labels is None or images is None or not self.training:  # validation loss stays the LM's alone
            return logits, loss
        pairs = self.contrastive(input_ids, images, attention_mask, labels)
        # normalised like the LM loss (its mean over the micro-batch's answer tokens): the trainer's
        # weighting by answer tokens then keeps accumulation and DDP exact, as for pretrain.Proxy
        return logits, loss + self.weight * pairs / (labels[:, 1:] != -100).sum()

    def contrastive(self, input_ids, images, attention_mask, labels):
        """The sigmoid loss summed over all (image, answer) pairs of the micro-batch's samples."""
        # a sample = a row, or with packing a (row, segment); 0 = padding, never an answer or an image
        seg = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        sample = torch.arange(len(seg), device=seg.device)[:, None] * (int(seg.max()) + 1) + seg
        is_image, answer = input_ids == self.cfg.image_token_id, labels != -100
        image_sample = sample[is_image].view(len(images), -1)[:, 0]  # images fill the <image> runs in order
        ids, where = torch.unique(torch.cat([image_sample, sample[answer]]), return_inverse=True)
        img_at, txt_at = where[:len(image_sample)], where[len(image_sample):]

        def pooled(at, x):  # the mean of x's rows per sample (and how many rows each sample has)
            n = torch.zeros(len(ids), device=x.device).index_add_(0, at, torch.ones(len(at), device=x.device))
            return torch.zeros(len(ids), x.shape[-1], device=x.device).index_add_(0, at, x) / n.clamp(min=1)[:, None], n
        img, n_img = pooled(img_at, images.float().mean(1))  # per image first (tiles: each tile the same weight)
        txt, n_txt = pooled(txt_at, self.lm.tok_embed(input_ids[answer]).float())
        both = (n_img > 0) & (n_txt > 0)  # samples with an image and an answer
        img, txt = F.normalize(img[both], dim=-1), F.normalize(txt[both], dim=-1)
        z = 2 * torch.eye(len(img), device=img.device) - 1  # +1 on the diagonal (the sample's own pair), else -1
        return -F.logsigmoid(z * (self.t * img @ txt.T + self.b)).sum()
