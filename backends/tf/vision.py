"""BLIP vision tower (ViT) in TensorFlow, and the public ``BlipVisionModel``.

Patch embedding, class token and learned positions; pre-LN encoder layers with a fused ``qkv``
projection laid out [q | k | v]; ``post_layernorm`` on every token and once more on the class token
for the pooler. ``interpolate_pos_encoding`` resizes the position grid with PyTorch's bicubic
kernel (A = -0.75, align_corners=False) as the spec layer's separable matrices
(``blip_core.interpolate``); ``tf.image.resize`` uses another kernel.

Example::

    model = BlipVisionModel(BlipVisionConfig(...), seed=0)
    out = model(pixel_values=np.zeros((1, 3, 384, 384), np.float32))
    out.last_hidden_state.shape   # (1, 577, 768)
"""
from __future__ import annotations

import tensorflow as tf

from blip_core.generation import check_pixel_values
from blip_core.interpolate import bicubic_matrix
from blip_core.outputs import BaseModelOutputWithPooling

from .generation import compiled, shape_signature
from ._base import (BlipTFModel, Dense, LayerNorm, Recorder, activation, as_float, attend, flag, merge_heads,
                    split_heads)


# -- position grid resizing ------------------------------------------------------------------
def interpolate_positions(pos, grid: int, new_h: int, new_w: int):
    """(1, 1+grid*grid, D) position table -> (1, 1+new_h*new_w, D); the class position is kept."""
    if new_h == grid and new_w == grid:
        return pos
    d = pos.shape[-1]
    patch = tf.reshape(tf.cast(pos[0, 1:], tf.float32), [grid, grid, d])
    rows = tf.constant(bicubic_matrix(grid, new_h), tf.float32)
    cols = tf.constant(bicubic_matrix(grid, new_w), tf.float32)
    out = tf.einsum("hi,ijd,wj->hwd", rows, patch, cols)
    out = tf.cast(tf.reshape(out, [1, new_h * new_w, d]), pos.dtype)
    return tf.concat([pos[:, :1], out], axis=1)


# -- tower ---------------------------------------------------------------------------------------
class VisionLayer(tf.Module):
    def __init__(self, params, p, cfg):
        super().__init__(name=None)
        self.heads = cfg.num_attention_heads
        self.qkv = Dense(params, f"{p}/self_attn/qkv", bias=f"{p}/self_attn/qkv/bias" in params)   # BLIP-2: qkv_bias
        self.projection = Dense(params, f"{p}/self_attn/projection")
        self.ln1 = LayerNorm(params, f"{p}/layer_norm1", cfg.layer_norm_eps)
        self.ln2 = LayerNorm(params, f"{p}/layer_norm2", cfg.layer_norm_eps)
        self.fc1 = Dense(params, f"{p}/mlp/fc1")
        self.fc2 = Dense(params, f"{p}/mlp/fc2")
        self.act = activation(cfg.hidden_act)

    def __call__(self, h, rec=None):
        q, k, v = tf.split(self.qkv(self.ln1(h)), 3, axis=-1)   # fused [q | k | v]
        ctx = attend(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads),
                     probs_out=rec.attn if rec is not None else None)
        h = h + self.projection(merge_heads(ctx))
        return h + self.fc2(self.act(self.fc1(self.ln2(h))))


class VisionTower(tf.Module):
    """The ViT under ``prefix`` (``vision_model`` in composite models, empty for BlipVisionModel)."""

    def __init__(self, params, prefix, cfg):
        super().__init__(name=None)
        p = f"{prefix}/" if prefix else ""
        self.cfg = cfg
        self.class_embedding = params[f"{p}embeddings/class_embedding"]
        self.position_embedding = params[f"{p}embeddings/position_embedding"]
        self.patch = Dense(params, f"{p}embeddings/patch_embedding")   # HWIO kernel, used as a matmul
        self.layers = [VisionLayer(params, f"{p}encoder/layers_{i}", cfg) for i in range(cfg.num_hidden_layers)]
        self.post_layernorm = LayerNorm(params, f"{p}post_layernorm", cfg.layer_norm_eps)

    def check(self, pixel_values, interpolate_pos_encoding: bool):
        check_pixel_values(tuple(pixel_values.shape), self.cfg.image_size, self.cfg.patch_size,
                           interpolate_pos_encoding)

    def embed(self, pixel_values, interpolate_pos_encoding: bool = False):
        p, d = self.cfg.patch_size, self.cfg.hidden_size
        b, _, height, width = pixel_values.shape
        gh, gw = height // p, width // p
        # A stride-p conv is a matmul over non-overlapping patches: (kh, kw, c) order matches HWIO.
        x = tf.reshape(pixel_values, [-1, 3, gh, p, gw, p])
        x = tf.reshape(tf.transpose(x, [0, 2, 4, 3, 5, 1]), [-1, gh * gw, p * p * 3])
        kernel = tf.reshape(self.patch.kernel, [p * p * 3, d])
        patches = tf.matmul(x, kernel) + self.patch.bias
        cls = tf.tile(self.class_embedding, [tf.shape(patches)[0], 1, 1])
        h = tf.concat([cls, patches], axis=1)
        pos = self.position_embedding
        if interpolate_pos_encoding:
            grid = int(round((pos.shape[1] - 1) ** 0.5))
            pos = interpolate_positions(pos, grid, gh, gw)
        return h + pos[:, : gh * gw + 1]

    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False, rec=None):
        """NCHW pixels -> (last_hidden_state (B, N+1, D), pooler_output (B, D)).

        ``rec`` (a ``Recorder``) collects the embeddings and every layer's output, before
        ``post_layernorm`` as transformers does, and each layer's attention probabilities.
        """
        h = self.embed(pixel_values, interpolate_pos_encoding)
        if rec is not None:
            rec.add_hidden(h)
        for layer in self.layers:
            h = layer(h, rec)
            if rec is not None:
                rec.add_hidden(h)
        last = self.post_layernorm(h)
        return last, self.post_layernorm(last[:, 0])


def vision_output(last, pooled, rec=None):
    """``BaseModelOutputWithPooling`` with the recorded hidden states / attentions (None when not asked)."""
    if rec is None:
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)
    return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                      hidden_states=Recorder.tup(rec.hidden), attentions=Recorder.tup(rec.attn))


class BlipVisionModel(BlipTFModel):
    """The BLIP ViT alone: ``last_hidden_state`` (B, N+1, D) and the double-LN ``pooler_output``."""

    architecture = "BlipVisionModel"

    def _build(self):
        self.vision_model = VisionTower(self.params, "", self.config)

    def forward(self, pixel_values=None, interpolate_pos_encoding: bool = False, output_attentions=False,
                output_hidden_states=False, return_dict: bool = True):
        px = as_float(pixel_values, self.dtype, "pixel_values")
        self.vision_model.check(px, interpolate_pos_encoding)
        rec = Recorder.make(flag(output_hidden_states, self.config, "output_hidden_states"),
                            flag(output_attentions, self.config, "output_attentions"))
        if rec is None:
            # One XLA program per input shape (``generation.compiled``'s bounded cache): fused layer norms,
            # GELU and softmax, 1.3x less CPU time than op-by-op execution on a 2-core CPU.
            interpolate = bool(interpolate_pos_encoding)
            program = compiled(self, ("vision", interpolate), lambda x: self.vision_model(x, interpolate),
                               shape_signature(px))
            last, pooled = program(px)
        else:
            last, pooled = self.vision_model(px, interpolate_pos_encoding, rec)
        out = vision_output(last, pooled, rec)
        return out if return_dict else out.to_tuple()

    def stages(self, pixel_values=None, interpolate_pos_encoding: bool = False, **_):
        out = self.forward(pixel_values, interpolate_pos_encoding)
        return {"vision": out.last_hidden_state, "vision_pooled": out.pooler_output}
