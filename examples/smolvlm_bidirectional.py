"""The same kind of local change made to transformers' own model (docs/hacking.md, example 2):
SmolVLM whose image tokens attend to each other, as picoVLM's VLMConfig(lm_image_attention=
"bidirectional") and Gemma 3 do. Each contiguous run of image tokens (an image, or one tile of a
split image) is one block: its tokens see the whole block; text stays causal and an image never
sees a later one.

    from examples.smolvlm_bidirectional import BidirectionalSmolVLM
    model = BidirectionalSmolVLM.from_pretrained("my-smolvlm")   # any SmolVLM checkpoint

Only forward changes: it turns the usual [B, T] padding mask into a [B, 1, T, T] one, which
transformers' masking_utils.create_causal_mask passes through as it is. Pass position_ids with a
left-padded batch, as generate() does (stock SmolVLM numbers the positions 0..T-1 otherwise).
"""
import torch
from transformers.models.smolvlm import SmolVLMForConditionalGeneration


def image_block_mask(input_ids, attention_mask, image_token_id):
    """[B, T] ids and 0/1 padding mask -> [B, 1, T, T] bool, True where a query may attend to a key."""
    T = input_ids.shape[1]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = input_ids == image_token_id
    first = is_image & ~torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
    block = torch.where(is_image, first.long().cumsum(1), 0)  # 1, 2, .. per run of image tokens, 0 for text
    pos = torch.arange(T, device=input_ids.device)
    earlier = (pos[None, :] <= pos[:, None])[None]  # [1, T(query), T(key)]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    mask = (earlier | same_block) & real[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=input_ids.device))[:, None]  # padding sees itself: no NaN row


class BidirectionalSmolVLM(SmolVLMForConditionalGeneration):
    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_attention_mask=None, **kwargs):
        """SmolVLM's forward (its arguments named here, as generate() checks them) with the 4D mask."""
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        whole_prompt = input_ids is not None and (past is None or past.get_seq_length() == 0) and (
            attention_mask is None or attention_mask.shape == input_ids.shape)
        if whole_prompt:  # later decoding steps are text: the usual causal mask over the cache is right
            mask = image_block_mask(input_ids, attention_mask, self.config.image_token_id)
            kind = self.config.text_config._attn_implementation
            if kind == "eager":  # eager adds its mask to the scores
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(self.dtype).min)
            elif kind != "sdpa":  # sdpa takes the bool mask itself
                raise ValueError(f"BidirectionalSmolVLM: attn_implementation {kind!r} (sdpa or eager only)")
            attention_mask = mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               pixel_attention_mask=pixel_attention_mask, **kwargs)
