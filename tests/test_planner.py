"""recipe.planner: the layout it picks for several (model, GPUs, card) cases against a brute force over
its own candidates, the fit rule against the estimator, the printed plan, parallelism.plan=auto in the
run's entry point, and the one-line exit 2 when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe import estimate as E
from recipe import planner as P
from recipe.config import load_config
from recipe.estimate import __main__ as CLI

REPO = Path(__file__).resolve().parents[1]


def _cfg(name: str, *overrides: str):
    return load_config(
        ["--job.config_file", str(REPO / "train_configs" / name), "--model.checkpoint=/nonexistent/p", *overrides]
    )


T4 = ("llama3_8b_qlora_t4.toml", "--model.synthetic_shape=llama3_1_8b")


@pytest.mark.parametrize(
    "config, ngpu, card",
    [
        (("llama3_8b_qlora.toml",), 1, "h100"),
        (("llama3_8b_qlora.toml",), 4, "h100"),
        (("llama3_8b_qlora.toml",), 2, "l4"),
        (T4, 2, "t4"),
        (("llama3_70b_qlora_2gpu.toml",), 2, "l4"),
    ],
)
def test_choice_is_the_fastest_that_fits(config, ngpu, card):
    cfg = _cfg(*config)
    options = P.plan(cfg, ngpu, card)
    chosen = options[0]
    gib = E.CARDS[card][1]
    # the fit rule, recomputed from the estimator for the chosen layout
    P.apply(cfg, chosen.layout, ngpu)
    assert E._peak(cfg, ngpu) == pytest.approx(max(chosen.peak_gib, chosen.load_gib), abs=1e-6)
    assert chosen.peak_gib * (1 + P.MARGIN) + P.RESERVE_GIB <= gib
    # nothing that fits is predicted faster by more than the tie band
    fastest = max(o.tokens_per_s for o in options if o.fits)
    assert chosen.tokens_per_s >= (1 - P.TIE) * fastest
    # the global batch is kept
    assert cfg.training.global_batch_size == _cfg(*config).training.global_batch_size or (
        _cfg(*config).training.global_batch_size == -1
    )


def test_known_choices():
    # 2x T4: the 4-bit 8B fits whole on each card, so replication (only LoRA gradients cross PCIe) wins
    t4 = P.plan(_cfg(*T4), 2, "t4")[0]
    assert (t4.layout.replicate, t4.layout.shard, t4.layout.cpu_offload) == (2, 1, False)
    assert t4.traffic_gb == pytest.approx(4 * 167_772_160 / 1e9, rel=1e-6)  # one all-reduce of fp32 LoRA grads
    # one 80 GiB H100: room to skip recomputation entirely
    h100 = P.plan(_cfg("llama3_8b_qlora.toml"), 1, "h100")[0]
    assert h100.layout.ac_mode == "none" and h100.layout.shard == 1
    # 70B on two 24 GiB cards: only CPU offload fits
    big = P.plan(_cfg("llama3_70b_qlora_2gpu.toml"), 2, "l4")
    assert big[0].layout.cpu_offload and not any(o.fits for o in big if not o.layout.cpu_offload)
    # and 64k tokens of 8B on one H100 must checkpoint every block
    long = ["--data.seq_len=65536", "--training.micro_batch_size=1", "--training.global_batch_size=1"]
    assert P.plan(_cfg("llama3_8b_qlora.toml", *long), 1, "h100")[0].layout.ac_mode == "full"


# benchmarks/planner_grid.sh on one H100 capped at 24 GiB (BENCHMARKS.md, 2026-12-07 seventh session): the 8B
# job (global batch 8) with no memory saver, compiled; tokens/s by (checkpointing mode, micro-batch).
GRID_24 = {
    ("full", 2): 9478,
    ("full", 4): 11321,
    ("full", 8): 11555,
    ("selective", 1): 9236,
    ("selective", 2): 12198,
    ("none", 1): 8386,
}


def test_plan_for_the_measured_grid_is_within_10_percent_of_its_fastest():
    # The measured oracle: the planner's first GPU check chose AC none at micro-batch 1 (predicted 13,176,
    # measured 7,728 / 8,386: one micro-batch of 2,048 tokens is shorter than the host's work for it).
    cfg = _cfg(
        "llama3_8b_qlora.toml",
        "--model.synthetic_shape=llama3_1_8b",
        "--training.global_batch_size=8",
        "--parallelism.host_embedding=false",
        "--parallelism.host_lm_head=false",
        "--activation_checkpoint.offload=false",
        "--activation_checkpoint.keep_outputs=",  # as the grid ran (the tree before keep_outputs' 'auto')
    )
    chosen = P.plan(cfg, 1, "h100", 24.0)[0].layout
    assert not (chosen.act_offload or chosen.host_embedding), chosen.describe()  # the grid ran no saver
    measured = GRID_24.get((chosen.ac_mode, chosen.micro_batch))
    assert measured is not None, chosen.describe()
    assert measured >= 0.9 * max(GRID_24.values()), chosen.describe()
    # the host floor is what ranks micro-batch 1 below 2: exposed there, hidden at 2
    j1 = E._job(_cfg("llama3_8b_qlora.toml", "--training.micro_batch_size=1", "--activation_checkpoint.mode=none"), 1)
    j2 = E._job(_cfg("llama3_8b_qlora.toml", "--training.micro_batch_size=2"), 1)
    assert E.step_time(j1, "h100", 1)[1]["host"] > 0.1
    assert E.step_time(j2, "h100", 1)[1]["host"] == 0.0


def test_printed_plan_says_what_keep_outputs_auto_keeps():
    # one H100 at 24 GiB: the chosen layout offloads activations, so 'auto' keeps o/gate/up (recipe.plan)
    options, report = P.best(_cfg("llama3_8b_qlora.toml"), 1, "h100", 24.0)
    chosen = options[0]
    assert chosen.layout.act_offload and chosen.kept
    assert f"chosen: {chosen.layout.describe()}, keeps o/gate/up outputs (1 in 2 checkpointed blocks)" in report
    assert not P.best(_cfg("llama3_8b_qlora.toml"), 2, "h100")[0][0].kept  # 2 ranks: nothing kept


def test_host_limit_is_respected():
    options = P.plan(_cfg("llama3_70b_qlora_2gpu.toml"), 2, "l4", host_gib=128)
    assert options[0].fits and options[0].host_gib * 2 <= 128


def test_cli_prints_plan_runner_up_and_why():
    out = []
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = CLI.main(
            ["--job.config_file", str(REPO / "train_configs/llama3_8b_qlora_t4.toml"), *T4[1:]]
            + ["--model.checkpoint=/nonexistent/p", "--ngpu", "2", "--card", "t4", "--plan", "--host-gib", "29"]
        )
    out = buf.getvalue()
    assert code == 0
    assert "chosen: HSDP 2x1" in out and "runner-up:" in out and "why:" in out and "of 29 GiB" in out


def test_cli_plan_args_are_the_chosen_layout(capsys):
    """--plan-args ends the output with the chosen layout as overrides: applied to the config they give
    that layout back (what benchmarks/t4_emulation.sh runs as the planner's 2x T4 layout)."""
    base = [
        "--job.config_file",
        str(REPO / "train_configs/llama3_8b_qlora_t4.toml"),
        *T4[1:],
        "--model.checkpoint=/nonexistent/p",
    ]
    assert CLI.main([*base, "--ngpu", "2", "--card", "t4", "--plan", "--host-gib", "29", "--plan-args"]) == 0
    overrides = capsys.readouterr().out.strip().splitlines()[-1].split()
    chosen = P.plan(_cfg(*T4), 2, "t4", host_gib=29)[0].layout
    assert overrides == P.layout_overrides(chosen)
    cfg = load_config([*base, *overrides])
    applied = _cfg(*T4)
    P.apply(applied, chosen, 2)
    assert {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in P.layout_keys(chosen)} == (
        P.layout_keys(chosen)
    )
    assert applied.activation_checkpoint == cfg.activation_checkpoint and applied.parallelism == cfg.parallelism
    assert CLI.main([*base, "--ngpu", "2", "--card", "t4", "--plan-args"]) == 2
    assert "add --plan" in capsys.readouterr().err


def test_impossible_request_exits_2_with_one_line(capsys):
    args = ["--job.config_file", str(REPO / "train_configs/llama3_70b_qlora_2gpu.toml"), "--ngpu", "1"]
    assert CLI.main(args + ["--card", "t4", "--plan", "--host-gib", "29"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no layout fits 1x t4 with 29 GiB of host RAM" in err
    assert CLI.main(args + ["--card", "t4", "--plan", "--data.seq_len=65536"]) == 2  # GPU memory alone
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no layout fits 1x t4 (15.0 GiB)" in err
    assert CLI.main(args + ["--plan"]) == 2 and "--plan needs the GPU" in capsys.readouterr().err


def test_plan_auto_changes_the_runs_config(monkeypatch):
    import recipe.train as T

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(P, "_detect", lambda: ("t4", 15.0))
    monkeypatch.setattr(P, "_host_total_gib", lambda: 29.0)
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(T, "Trainer", fake_trainer)
    base = [
        "--job.config_file",
        str(REPO / "train_configs/llama3_8b_qlora_t4.toml"),
        *T4[1:],
        "--model.checkpoint=/nonexistent/p",
    ]
    base += ["--model.checkpoint=/nonexistent/p"]
    with pytest.raises(Stop):
        T.main(base + ["--parallelism.plan=auto"])
    p = seen["cfg"].parallelism
    assert (p.data_parallel_replicate_degree, p.data_parallel_shard_degree) == (2, 1)
    assert seen["cfg"].training.global_batch_size == 8
    with pytest.raises(Stop):
        T.main(base)  # plan=off: as configured
    assert seen["cfg"].parallelism.data_parallel_replicate_degree == 1


def test_plan_auto_nothing_fits_exits_2_before_loading(monkeypatch, capsys):
    import recipe.train as T

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(P, "_detect", lambda: ("t4", 15.0))
    monkeypatch.setattr(P, "_host_total_gib", lambda: 29.0)
    monkeypatch.setattr(T, "Trainer", lambda cfg: pytest.fail("loaded although nothing fits"))
    args = ["--job.config_file", str(REPO / "train_configs/llama3_70b_qlora_2gpu.toml"), "--parallelism.plan=auto"]
    assert T.main(args) == 2
    assert "no layout fits 1x t4 with 29 GiB of host RAM" in capsys.readouterr().err


def test_card_names():
    assert P.card_of("NVIDIA H100 80GB HBM3") == "h100" and P.card_of("Tesla T4") == "t4"
    assert (
        P.card_of("NVIDIA H200") == "h200" and P.card_of("NVIDIA L4") == "l4" and P.card_of("GeForce RTX 4090") is None
    )


def test_plan_auto_refuses_pipelines():
    from recipe.config import ConfigError

    cfg = _cfg("debug_model.toml", "--parallelism.plan=auto", "--parallelism.pipeline_parallel_degree=2")
    with pytest.raises(ConfigError, match="not pipelines"):
        P.plan_for_run(cfg, devices=("h100", 79.6))
