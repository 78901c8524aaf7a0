"""The ViT image tower of BLIP and BLIP-2 (``BlipVisionConfig`` or ``Blip2VisionConfig``).

Module names reproduce the Hugging Face state-dict keys (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.qkv``, ``post_layernorm``, ...). Pre-LN layers with a fused
``qkv`` projection laid out ``[q | k | v]``; ``last_hidden_state = post_layernorm(h)`` and
``pooler_output = post_layernorm(last_hidden_state[:, 0])`` (the class token is normalised twice,
as in transformers). For ``Blip2VisionConfig`` the ``qkv`` bias exists only when
``config.qkv_bias`` (its k third is zero in real checkpoints).

Example::

    tower = BlipVisionTransformer(config)             # usually inside a PreTrainedModel
    out = tower(pixel_values)                         # (B, 3, H, W) float
    out.last_hidden_state.shape                       # (B, 1 + (H/p)*(W/p), D)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.batching import images_per_chunk
from blip_core.generation import check_pixel_values
from blip_core.outputs import BaseModelOutput, BaseModelOutputWithPooling

from ._base import PreTrainedModel, as_tensor, attention
from .layout import Linear, linear_act, prepare_wide


class BlipVisionEmbeddings(nn.Module):
    """Conv patch embedding + class token + learned positions (bicubic-resized on request)."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, config.num_patches + 1, d))

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding
        n_old = pos.shape[1] - 1
        if num_patches == n_old and height == width:
            return pos
        side = int(round(n_old ** 0.5))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # PyTorch bicubic (A=-0.75, align_corners=False, no antialias) in float32, as the reference.
        grid = F.interpolate(grid.float(), size=(height // self.patch_size, width // self.patch_size),
                             mode="bicubic", align_corners=False).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(dtype), patches], dim=1)
        pos = self.position_embedding
        if interpolate_pos_encoding:
            pos = self.interpolate_pos_encoding(x.shape[1] - 1, h, w)
        return x + pos[:, : x.shape[1]].to(dtype)


class BlipAttention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` Linear and an output ``projection``."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = float(config.attention_dropout)
        self.qkv = Linear(d, 3 * d, bias=bool(getattr(config, "qkv_bias", True)))
        self.projection = Linear(d, d)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        b, n, d = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx, probs = attention(qkv[0], qkv[1], qkv[2], scale=self.scale, output_attentions=output_attentions,
                               dropout=self.dropout if self.training else 0.0)
        return self.projection(ctx.transpose(1, 2).reshape(b, n, d)), probs


class BlipMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act_name = config.hidden_act
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_act(self.fc1, x, self.act_name))


class BlipEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.self_attn = BlipAttention(config)
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = BlipMLP(config)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        h, probs = self.self_attn(self.layer_norm1(x), output_attentions)
        x = x + h
        x = x + self.mlp(self.layer_norm2(x))
        return x, probs


class BlipEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([BlipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x, output_attentions: bool = False, output_hidden_states: bool = False) -> BaseModelOutput:
        step = x.shape[0]
        if len(self.layers) and not (output_attentions or output_hidden_states or torch.is_grad_enabled()):
            # a few images at a time: same numbers, outputs of bounded size (blip_core.batching)
            first = self.layers[0]
            widest = max(first.mlp.fc1.out_features, first.self_attn.qkv.out_features)
            step = images_per_chunk(x.shape[0], x.shape[1], widest, x.element_size())
        if step < x.shape[0]:
            out = torch.cat([self._layers(x[i:i + step]) for i in range(0, x.shape[0], step)])
            return BaseModelOutput(last_hidden_state=out, hidden_states=None, attentions=None)
        states = (x,) if output_hidden_states else None
        attns = () if output_attentions else None
        for layer in self.layers:
            x, probs = layer(x, output_attentions)
            if output_hidden_states:
                states += (x,)
            if output_attentions:
                attns += (probs,)
        return BaseModelOutput(last_hidden_state=x, hidden_states=states, attentions=attns)

    def _layers(self, x):
        for layer in self.layers:
            x = layer(x)[0]
        return x


class BlipVisionTransformer(nn.Module):
    """Embeddings -> encoder -> ``post_layernorm``; returns ``BaseModelOutputWithPooling``.

    ``hidden_states`` (when asked) are the embeddings and every layer's output before the final
    layer norm; ``attentions`` are the per-layer probabilities (B, H, N, N).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BlipVisionEmbeddings(config)
        self.encoder = BlipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def check_pixel_values(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Numpy or tensor -> a float tensor on the tower's device, or a clear ``ValueError``."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        pixel_values = as_tensor(pixel_values, "pixel_values", kind="float", device=self.post_layernorm.weight.device)
        check_pixel_values(tuple(pixel_values.shape), self.config.image_size, self.config.patch_size,
                           bool(interpolate_pos_encoding))
        return pixel_values

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False, output_attentions: bool = False,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        pixel_values = self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        prepare_wide(self)    # inference: the products run on weights packed once for oneDNN (``layout.prepare_wide``)
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        enc = self.encoder(x, output_attentions=bool(output_attentions),
                           output_hidden_states=bool(output_hidden_states))
        last = self.post_layernorm(enc.last_hidden_state)
        pooled = self.post_layernorm(last[:, 0])
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                          hidden_states=enc.hidden_states, attentions=enc.attentions)


class BlipVisionModel(BlipVisionTransformer, PreTrainedModel):
    """The vision tower as a public model (``BlipVisionConfig``; keys without a prefix).

    ``model(pixel_values)`` -> ``BaseModelOutputWithPooling`` with ``last_hidden_state``
    (B, N+1, D) and ``pooler_output`` (B, D).
    """

    architecture = "BlipVisionModel"

    def __init__(self, config, seed=0, dtype=None):
        BlipVisionTransformer.__init__(self, config)
        self.post_init(seed, dtype)

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, output_attentions=False,
                output_hidden_states=False, return_dict=True):
        out = super().forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                              output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return out if return_dict or return_dict is None else out.to_tuple()

    def stages(self, pixel_values, interpolate_pos_encoding=False, **_):
        out = self.forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return {"vision": out.last_hidden_state, "vision_pooled": out.pooler_output}
