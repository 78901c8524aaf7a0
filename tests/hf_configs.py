"""Tiny transformers configs used across tests (the reference side builds its models from these)."""


def blip_dicts(vision=None, text=None):
    vc = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    tc = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, bos_token_id=96, sep_token_id=97, pad_token_id=0)
    vc.update(vision or {})
    tc.update(text or {})
    return vc, tc


def core_blip_config(**kw):
    """``blip_core``'s BlipConfig of ``blip_dicts()`` (no transformers import: usable in child processes)."""
    from blip_core.configs import BlipConfig
    vc, tc = blip_dicts()
    kw.setdefault("projection_dim", 16)
    kw.setdefault("image_text_hidden_size", 24)
    return BlipConfig(vision_config=vc, text_config=tc, **kw)


def tiny_pixels(batch=2, seed=7):
    """A (batch, 3, 32, 32) float32 pixel batch for ``blip_dicts()``'s image size."""
    import numpy as np
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def blip_config(vision=None, text=None, **kw):
    import transformers
    vc, tc = blip_dicts(vision, text)
    kw.setdefault("projection_dim", 16)
    kw.setdefault("image_text_hidden_size", 24)
    return transformers.BlipConfig(vision_config=vc, text_config=tc, **kw)


OPT_TEXT = dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                max_position_embeddings=40)
T5_TEXT = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)


def blip2_config(text=None, qformer=None, vision=None, **kw):
    import transformers
    vc = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    qc = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
              cross_attention_frequency=2, max_position_embeddings=40)
    vc.update(vision or {})
    qc.update(qformer or {})
    kw.setdefault("num_query_tokens", 4)
    return transformers.Blip2Config(vision_config=vc, qformer_config=qc, text_config=dict(text or OPT_TEXT), **kw)


def hf_blip_model(cls_name, cfg, seed=0, spread=0.25):
    """A transformers BLIP model (eval mode) of ``cls_name`` whose weights get seeded normal noise of std
    ``spread`` added, so that reference outputs are not degenerate (the vision init is std 1e-10)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    sub = {"BlipVisionModel": cfg.vision_config, "BlipTextModel": cfg.text_config}.get(cls_name, cfg)
    model = getattr(transformers, cls_name)(sub)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model.eval()


def randomize(model, seed, std=0.5):
    """Give every parameter of a transformers model a seeded, non-trivial value (its default init
    leaves norms at 1, biases and BLIP-2's query tokens at 0)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
