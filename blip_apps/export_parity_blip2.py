"""``blip export-parity`` rows of a BLIP-2 ONNX bundle against the torch ``Blip2ForConditionalGeneration``.

Stages: the vision tower, the Q-Former queries and their projection (``vision_qformer.onnx``), the
first decode step's logits (``output_scores`` of a one-token greedy ``generate``: the prompt
call of the decoder step, through the T5 encoder for T5); then ids, greedy and with 3 beams, on
the parity inputs' padded prompts and (greedy) on the default prompt.
"""
from __future__ import annotations

from blip_core import blip2 as rules


def _new_tokens(config, prompt_length: int) -> int:
    if not rules.is_decoder_only(config):
        return 8
    return max(1, min(8, config.text_config.max_position_embeddings + 1 - prompt_length))


def onnx_blip2_rows(runner, model, inp, array_row, ids_row) -> list:
    """``array_row(stage, got, want, dtype)`` and ``ids_row(stage, got, want)`` build the rows."""
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    got = runner.image_stages(px)
    lm_inputs, vision, qformer = model.get_image_features(px, return_dict=True)
    rows = [array_row("vision_qformer.vision", got["vision"], vision.last_hidden_state, "float32"),
            array_row("vision_qformer.qformer", got["qformer"], qformer.last_hidden_state, "float32"),
            array_row("vision_qformer.projection", got["projection"], lm_inputs, "float32")]
    prompt = dict(input_ids=ids, attention_mask=mask)
    first = dict(max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    rows.append(array_row("decoder_step.logits", runner.generate(px, **prompt, **first).scores[0],
                          model.generate(px, **prompt, **first).scores[0], "float32"))
    n = _new_tokens(model.config, ids.shape[1])
    for beams in (1, 3):
        options = dict(max_new_tokens=n, num_beams=beams)
        rows.append(ids_row(f"generate.num_beams={beams}", runner.generate(px, **prompt, **options),
                            model.generate(px, **prompt, **options)))
    start = rules.default_prompt(model.config, 1).shape[1]
    options = dict(max_new_tokens=_new_tokens(model.config, start))
    rows.append(ids_row("generate.default_prompt", runner.generate(px, **options), model.generate(px, **options)))
    return rows
