"""The captioning floor of the benchmarks (issue 19): image compute at the matmul rate plus the decoder's
weight bytes per token at the memory bandwidth, one definition (``common.compute_bandwidth_floor_s`` of
``caption.caption_floor_terms``) recorded by the harness and turned into a target row by ``run_all``."""
import pytest

from benchmarks import caption, common, run_all


def test_greedy_batch1_floor_is_image_compute_plus_weight_bytes_per_token():
    cfg = caption.config(False)
    tc, vc = cfg.text_config, cfg.vision_config
    rate, bw = 2e11, 2.5e10
    fl = caption.caption_floor_s(cfg, 1, 1, 20, rate, bw)
    # hand count: 12 layers of self q/k/v/o (4 d^2), cross q/o (2 d^2), FFN (2 d i); LM head transform + vocab
    d, i = tc.hidden_size, tc.intermediate_size
    per_token = 4 * (12 * (6 * d * d + 2 * d * i) + d * d + d * tc.vocab_size)
    assert 480e6 < per_token < 500e6 and fl["decoder_bytes_per_step"] == per_token
    m = (vc.image_size // vc.patch_size) ** 2 + 1
    image = common.vit_flops(vc, 1) + 12 * 4 * m * vc.hidden_size * d
    assert fl["steps_bound"] == "bytes"
    assert fl["total_s"] == pytest.approx(image / rate + 20 * per_token / bw)
    assert fl["vision_s"] + fl["cross_kv_s"] == pytest.approx(image / rate)


def test_large_batches_are_bound_by_the_steps_flops_when_they_exceed_the_bytes():
    terms = {"once_flops": 1e9, "step_flops": 8e9, "step_bytes": 1e9}
    fl = common.compute_bandwidth_floor_s(terms, rate=1e9, bandwidth=1e9)
    assert fl["steps_bound"] == "flops" and fl["total_s"] == pytest.approx(9.0)


def test_targets_hold_each_backends_greedy_time_over_its_floor():
    def ok(median, ratio):
        return {"status": "ok", "median_s": median, "time_over_compute_bandwidth_floor": ratio}
    greedy = {"workload": "caption", "mode": "greedy", "params": {"batch": 1},
              "results": {"torch": ok(1.2, 1.25), "tf": ok(1.5, 1.5), "jax": {"status": "error"}, "hf-torch": ok(2.0, 1.9)}}
    rows = [t for t in run_all.evaluate_targets([greedy])
            if t["target"] == "caption greedy batch 1: time / own floor (compute + bandwidth)"]
    assert [(t["impl"], t["value"], t["met"]) for t in rows] == [(b, {"torch": 1.25, "tf": 1.5}.get(b),
                                                                     {"torch": True, "tf": False}.get(b))
                                                                    for b in common.OURS]
    assert all(t["threshold"] == 1.3 and t["comparison"] == "<=" for t in rows)


def test_memory_bandwidth_reports_read_and_copy():
    bw = common.memory_bandwidth(mb=8, reps=2)
    assert bw["best_bytes_per_s"] == max(bw["read_best_bytes_per_s"], bw["copy_best_bytes_per_s"]) > 0
