"""BLIP vision tower in Flax linen: patch embedding, pre-LN ViT encoder, post layer norm.

Parameter paths follow the weight table (``embeddings/patch_embedding/kernel`` HWIO,
``encoder/layers_3/self_attn/qkv/kernel``, ...). ``pixel_values`` arrive NCHW as in every backend; the
patch embedding is computed as a matmul over flattened patches, which equals the stride-p convolution.

``interpolate_pos_encoding`` resizes the patch position grid with PyTorch's bicubic kernel (A = -0.75,
align_corners=False, border taps clamped) as two interpolation matrices from ``blip_core.interpolate``,
because ``jax.image.resize`` uses a different cubic kernel.

Example::

    model = BlipVisionModel(BlipVisionConfig(), seed=0)
    out = model(pixel_values=np.zeros((1, 3, 384, 384), np.float32))
    out.last_hidden_state.shape   # (1, 577, 768)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip_core.configs import BlipVisionConfig
from blip_core.generation import check_pixel_values
from blip_core.interpolate import bicubic_matrix
from blip_core.numerics import attention_head_group
from blip_core.outputs import BaseModelOutputWithPooling

from ._base import JaxModel, activation, pixels, softmax

_ZEROS = nn.initializers.zeros


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (params ``scale``, ``bias``): two-pass statistics and affine in float32, output in
    the input dtype, as torch computes half-precision inputs. (Flax's version promotes implicitly, which
    strict dtype promotion rejects, and by default uses the less accurate E[x^2] - E[x]^2 variance.)"""

    eps: float

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", _ZEROS, (d,))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# -- position interpolation ------------------------------------------------------------------------
def interpolate_positions(position_embedding, new_h: int, new_w: int):
    """Resize the (1, 1 + g*g, D) position table to a (new_h, new_w) patch grid; the class position is kept."""
    n = position_embedding.shape[1] - 1
    g = int(n ** 0.5)
    if (new_h, new_w) == (g, g):
        return position_embedding
    d = position_embedding.shape[-1]
    grid = position_embedding[0, 1:].reshape(g, g, d).astype(jnp.float32)
    my, mx = (jnp.asarray(bicubic_matrix(g, s).astype(np.float32)) for s in (new_h, new_w))
    out = jnp.einsum("yi,ijd,xj->yxd", my, grid, mx, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(1, new_h * new_w, d).astype(position_embedding.dtype)
    return jnp.concatenate([position_embedding[:, :1], out], axis=1)


# -- modules -------------------------------------------------------------------------------------------
class PatchEmbedding(nn.Module):
    """Conv2d(3, D, kernel=stride=p) as one matmul; kernel stored HWIO like ``nn.Conv``."""

    features: int
    patch: int

    @nn.compact
    def __call__(self, x):                       # x: (B, 3, H, W)
        b, c, h, w = x.shape
        p = self.patch
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features))
        bias = self.param("bias", _ZEROS, (self.features,))
        x = x.astype(kernel.dtype).reshape(b, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)   # row-major patch grid
        return x @ kernel.reshape(p * p * c, self.features) + bias


class VisionEmbeddings(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.class_embedding = self.param("class_embedding", _ZEROS, (1, 1, c.hidden_size))
        self.position_embedding = self.param("position_embedding", _ZEROS, (1, c.num_patches + 1, c.hidden_size))
        self.patch_embedding = PatchEmbedding(c.hidden_size, c.patch_size)

    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False):
        b, _, h, w = pixel_values.shape
        patches = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = self.position_embedding
        if interpolate_pos_encoding:
            p = self.config.patch_size
            pos = interpolate_positions(pos, h // p, w // p)
        return x + pos[:, : x.shape[1]].astype(x.dtype)


def _attend(q, k, v):
    """Softmax attention on (..., N, hd) blocks, ``q`` already scaled; the softmax is normalised after the product,
    dividing (N, hd) values instead of the (N, N) probabilities (one pass less over the largest tensor)."""
    scores = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    ctx = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v).astype(jnp.float32)
    return (ctx / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


class VisionAttention(nn.Module):
    """Fused qkv ([q | k | v], heads inside each), scale hd^-0.5, output ``projection``."""

    config: Any

    def setup(self):
        d = self.config.hidden_size
        self.qkv = nn.Dense(3 * d)
        self.projection = nn.Dense(d)

    def __call__(self, x):
        b, n, d = x.shape
        heads = self.config.num_attention_heads
        hd = d // heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)      # (3, B, heads, N, hd)
        # The scale goes on q (N x hd values) rather than on the (N x N) scores: exact for hd = 64 (a power of 4).
        q, k, v = qkv[0] * np.asarray(hd ** -0.5, qkv.dtype), qkv[1], qkv[2]
        g = attention_head_group(heads, n, np.dtype(qkv.dtype).itemsize)   # blocks of g heads stay in cache
        blocks = (b * heads // g, g, n, hd)
        ctx = jax.lax.map(lambda t: _attend(*t), (q.reshape(blocks), k.reshape(blocks), v.reshape(blocks)))
        ctx = ctx.reshape(b, heads, n, hd).transpose(0, 2, 1, 3).reshape(b, n, d)
        # Only for output_attentions; under jit an unused value is not computed.
        probs = softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k))
        return self.projection(ctx), probs


class VisionMLP(nn.Module):
    config: Any

    def setup(self):
        self.fc1 = nn.Dense(self.config.intermediate_size)
        self.fc2 = nn.Dense(self.config.hidden_size)

    def __call__(self, x):
        return self.fc2(activation(self.config.hidden_act)(self.fc1(x)))


class VisionLayer(nn.Module):
    config: Any

    def setup(self):
        eps = self.config.layer_norm_eps
        self.self_attn = VisionAttention(self.config)
        self.layer_norm1 = LayerNorm(eps)
        self.mlp = VisionMLP(self.config)
        self.layer_norm2 = LayerNorm(eps)

    def __call__(self, x):
        """Returns ``(output, attention probabilities)``."""
        attn, probs = self.self_attn(self.layer_norm1(x))
        x = x + attn
        return x + self.mlp(self.layer_norm2(x)), probs


class VisionEncoder(nn.Module):
    config: Any

    def setup(self):
        self.layers = [VisionLayer(self.config) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x):
        """Returns ``(output, hidden_states, attentions)``: the input and every layer's output, and every
        layer's attention probabilities (pre post_layernorm, as transformers reports them)."""
        hidden, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x)
            hidden.append(x)
            attentions.append(probs)
        return x, tuple(hidden), tuple(attentions)


class VisionTransformer(nn.Module):
    """Returns ``(last_hidden_state, pooler_output)``; the pooler applies post_layernorm a second time."""

    config: Any

    def setup(self):
        self.embeddings = VisionEmbeddings(self.config)
        self.encoder = VisionEncoder(self.config)
        self.post_layernorm = LayerNorm(self.config.layer_norm_eps)

    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False):
        return self.full(pixel_values, interpolate_pos_encoding)[:2]

    def full(self, pixel_values, interpolate_pos_encoding: bool = False):
        """``(last_hidden_state, pooler_output, hidden_states, attentions)``; under jit the unused entries
        cost nothing, so the plain path is unchanged."""
        x, hidden, attentions = self.encoder(self.embeddings(pixel_values, interpolate_pos_encoding))
        last = self.post_layernorm(x)
        return last, self.post_layernorm(last[:, 0]), hidden, attentions


def vision_inputs(config, pixel_values, interpolate_pos_encoding: bool, dtype):
    """Validated NCHW pixels in the model dtype."""
    pv = pixels(pixel_values, dtype)
    check_pixel_values(pv.shape, config.image_size, config.patch_size, interpolate_pos_encoding)
    return pv


class BlipVisionModel(JaxModel):
    """The vision tower alone: ``last_hidden_state`` (B, 1 + N, D) and ``pooler_output`` (B, D)."""

    config_class = BlipVisionConfig

    def _module(self):
        return VisionTransformer(self.config)

    def _forward(self, params, pv, interpolate, output_hidden_states=False, output_attentions=False):
        last, pooled, hidden, attentions = self.module.apply({"params": params}, pv, interpolate,
                                                             method=VisionTransformer.full)
        return (last, pooled, hidden if output_hidden_states else None,
                attentions if output_attentions else None)

    def __call__(self, pixel_values=None, interpolate_pos_encoding: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        pv = vision_inputs(self.config, pixel_values, interpolate_pos_encoding, self.dtype)
        fn = self._jit("forward", "_forward", ("interpolate", "output_hidden_states", "output_attentions"))
        last, pooled, hidden, attentions = fn(self._params(params), pv, interpolate=bool(interpolate_pos_encoding),
                                              output_hidden_states=bool(output_hidden_states),
                                              output_attentions=bool(output_attentions))
        out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                       attentions=attentions)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs) -> dict:
        out = self(**inputs)
        return {"vision": out.last_hidden_state, "vision_pooled": out.pooler_output}
