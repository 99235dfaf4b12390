"""The fine-tune gauge sweep: its summaries (against a direct computation) and gauge (in)variance of real runs."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from benchmarks import finetune
from benchmarks.finetune import sweep


def _cfg(gauges, seeds=3):
    return dict(finetune.SIZES["quick"], sweep=dict(gauges=gauges, seeds=seeds, protocol=dict(steps=8)))


def test_sweep_summaries_pair_the_seeds():
    gauges, seeds = [0.01, 1.0, 100.0], [0, 1, 2]
    shift = {0.01: -3.0, 1.0: 0.0, 100.0: 1.5}  # what the gauge does; the seed adds noise of its own

    def one(s, seed):
        acc = 70.0 + 5.0 * seed + shift[s]
        return {"acc": acc, "train_loss": [9.0] * 6 + [0.5 + 0.1 * seed + shift[s] / 10] * 2}

    out = sweep.run_sweep(one, _cfg(gauges), seeds)
    # the seed spread (std 5) is far above the gauge effect, yet the seed-paired change is exact
    assert out["acc_max_change"] == pytest.approx(3.0, abs=1e-12)
    assert out["final_train_loss_max_change"] == pytest.approx(0.3, abs=1e-12)
    acc1 = [70.0 + 5.0 * k + shift[0.01] for k in seeds]
    assert out["acc_mean_std"][0] == pytest.approx([statistics.fmean(acc1), statistics.stdev(acc1)], abs=1e-12)
    flat = sweep.run_sweep(lambda s, seed: one(1.0, seed), _cfg(gauges), seeds)
    assert flat["acc_max_change"] == 0.0 and flat["final_train_loss_max_change"] == 0.0


def test_a_diverged_run_scores_inf_and_the_sweep_needs_s_equal_one():
    assert sweep.final_train_loss({"train_loss": [1.0, 2.0, math.nan, 1.0]}, steps=8) == math.inf
    assert sweep.final_train_loss({"train_loss": [3.0, 1.0, 2.0]}, steps=8) == 1.5  # the last steps // 4
    diverged = sweep.run_sweep(
        lambda s, seed: {"acc": 50.0, "train_loss": [1.0, math.nan if s > 1 else 1.0]}, _cfg([1.0, 10.0]), [0]
    )
    assert diverged["final_train_loss_max_change"] is None and diverged["acc_max_change"] == 0.0
    assert diverged["final_train_loss_mean_std"] == [[1.0, 0.0], [None, None]]
    with pytest.raises(ValueError, match="s = 1"):
        sweep.sweep_protocol(_cfg([0.1, 10.0]))
    assert sweep.sweep_protocol(_cfg([1.0]))["steps"] == 8


def _tiny_run(name, lr, gauge_s):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = finetune.Classifier(BertModel(bert).eval(), n_classes=3)
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 30, (int(n),), generator=gen).tolist() for n in torch.randint(3, 9, (64,), generator=gen)]
    data = {"train_ids": ids, "train_y": [sum(x) % 3 for x in ids], "test_ids": ids[:16], "test_y": [0] * 16}
    data["pad_id"] = 0
    cfg = dict(finetune.SIZES["quick"], steps=6, eval_every=0)
    start = finetune.init_adapter(model, 0, 3, "random")  # nonzero A and B: the gauge acts on both
    return finetune.train_run(model, name, lr, cfg, data, start, 0, gauge_s=gauge_s)["train_loss"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_invariant_optimizers_follow_the_same_losses_from_every_gauge_adamw_does_not():
    pytest.importorskip("peft")
    ref = {name: _tiny_run(name, 1e-2, 1.0) for name in ("lora_rite", "scaled_gd", "adamw")}
    for s in (0.01, 100.0):
        for name in ("lora_rite", "scaled_gd"):
            # float32 training from factors 100x apart: the rounding of the rescaled factors moves
            # LoRA-RITE's losses by ~1e-5 relative over these 6 steps (ScaledGD's not at all here);
            # 1e-4 leaves room for that and is far below AdamW's gauge effect (~0.1-0.25 relative)
            assert _tiny_run(name, 1e-2, s) == pytest.approx(ref[name], rel=1e-4), name
        adamw = _tiny_run("adamw", 1e-2, s)
        assert max(abs(a - b) / b for a, b in zip(adamw, ref["adamw"])) > 1e-2
