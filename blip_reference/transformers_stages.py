"""The transformers column of the parity harness (a test-only reference, imported lazily).

``reference_stages(directory, inputs)`` loads the checkpoint with transformers 4.57's PyTorch class
of the same name and returns the same named stages the backends' ``stages()`` return, taken
from transformers' outputs (or, where a stage is not an output, from its submodules called the
way its forward calls them). Only the parity harness imports this module, and only when the
user asks for ``--reference transformers``; it lives outside the library packages for that reason.
"""
from __future__ import annotations

import numpy as np


def _run(model, arch: str, t: dict) -> dict:
    import torch

    def vision(px):
        v = model.vision_model(pixel_values=px)
        return v, {"vision": v.last_hidden_state, "vision_pooled": v.pooler_output}

    if arch in ("BlipVisionModel", "Blip2VisionModel"):
        o = model(**t)
        return {"vision": o.last_hidden_state, "vision_pooled": o.pooler_output}
    if arch == "BlipTextModel":
        return {"text": model(**t).last_hidden_state}
    if arch == "Blip2QFormerModel":
        return {"qformer": model(**t).last_hidden_state}
    if arch == "BlipModel":
        o = model(**t)
        return {"vision": o.vision_model_output.last_hidden_state, "vision_pooled": o.vision_model_output.pooler_output,
                "text": o.text_model_output.last_hidden_state, "image_embeds": o.image_embeds,
                "text_embeds": o.text_embeds, "logits_per_image": o.logits_per_image}
    if arch == "BlipForConditionalGeneration":
        v, st = vision(t["pixel_values"])
        dec = model.text_decoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                 encoder_hidden_states=v.last_hidden_state, labels=t.get("labels"),
                                 output_hidden_states=True, reduction="mean")
        st = {"vision": st["vision"], "lm_hidden": dec.hidden_states[-1], "logits": dec.logits}
        if dec.loss is not None:
            st["loss"] = dec.loss
        return st
    if arch == "BlipForImageTextRetrieval":
        o = model(**t, use_itm_head=True)
        return {"vision": o.last_hidden_state, "text": o.question_embeds, "itm_score": o.itm_score}
    if arch == "BlipForQuestionAnswering":
        v, _ = vision(t["pixel_values"])
        img_mask = torch.ones(v.last_hidden_state.shape[:-1], dtype=torch.long)
        q = model.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                               encoder_hidden_states=v.last_hidden_state, encoder_attention_mask=img_mask)
        labels = t["labels"]
        dec = model.text_decoder(input_ids=labels, encoder_hidden_states=q.last_hidden_state,
                                 encoder_attention_mask=t["attention_mask"], labels=labels,
                                 output_hidden_states=True, reduction="mean")
        return {"vision": v.last_hidden_state, "text": q.last_hidden_state, "lm_hidden": dec.hidden_states[-1],
                "logits": dec.logits, "loss": dec.loss}
    if arch in ("Blip2Model", "Blip2ForConditionalGeneration"):
        o = model(**t, output_hidden_states=True)
        lm = o.language_model_outputs
        hidden = lm.hidden_states if getattr(lm, "hidden_states", None) is not None else lm.decoder_hidden_states
        query = o.qformer_outputs.last_hidden_state
        # transformers keeps the Q-Former in float32 (_keep_in_fp32_modules) and casts its output to
        # the projection's dtype inside forward; the stage is taken the same way
        projected = model.language_projection(query.to(model.language_projection.weight.dtype))
        return {"vision": o.vision_outputs.last_hidden_state, "vision_pooled": o.vision_outputs.pooler_output,
                "qformer": query, "projection": projected, "lm_hidden": hidden[-1],
                "logits": o.logits}
    if arch == "Blip2ForImageTextRetrieval":
        o = model(**t, use_image_text_matching_head=False)
        return {"vision": o.vision_model_output.last_hidden_state, "text": o.text_model_output.last_hidden_state,
                "image_embeds": o.image_embeds, "text_embeds": o.text_embeds, "logits_per_image": o.logits_per_image}
    if arch == "Blip2TextModelWithProjection":
        o = model(**t)
        return {"text": o.last_hidden_state, "text_embeds": o.text_embeds}
    if arch == "Blip2VisionModelWithProjection":
        v, _ = vision(t["pixel_values"])
        queries = model.query_tokens.expand(v.last_hidden_state.shape[0], -1, -1)
        q = model.qformer(query_embeds=queries, encoder_hidden_states=v.last_hidden_state)
        return {"vision": v.last_hidden_state, "qformer": q.last_hidden_state,
                "image_embeds": model(**t).image_embeds}
    raise ValueError(f"no reference stages for {arch}")


def reference_stages(directory: str, inputs: dict, dtype: str = "float32") -> dict:
    """``{stage: numpy array}`` from transformers' PyTorch class for ``directory``'s architecture."""
    import torch
    import transformers

    from blip_core import architecture_of

    arch = architecture_of(directory)
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(directory, torch_dtype=getattr(torch, dtype)).eval()
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    t = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in t.items()}
    with torch.no_grad():
        stages = _run(model, arch, t)
    return {k: v.detach().float().numpy() for k, v in stages.items()}
