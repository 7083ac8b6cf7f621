import dataclasses

import pytest

from recipe.config import (
    ConfigError,
    JobConfig,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_config,
)


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_without_file():
    cfg = load_config([])
    assert cfg == JobConfig()
    assert cfg.lora.target_modules[0] == "q_proj"
    assert cfg.profiling.profile_steps == []
    # default lists must not be shared between instances
    JobConfig().lora.target_modules.append("x")
    assert "x" not in JobConfig().lora.target_modules


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nmicro_batch_size = 3\n[optimizer]\nlr = 1\n")
    cfg = load_config(["--job.config_file", path, "--training.steps=9"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.micro_batch_size == 3  # TOML beats default
    assert cfg.training.max_norm == 1.0  # default
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)  # int accepted for float
    assert cfg.job.config_file == path


def test_equals_and_space_forms(tmp_path):
    path = write(tmp_path, "")
    a = load_config([f"--job.config_file={path}", "--job.seed=5", "--optimizer.lr=2e-4", "--job.description=x y"])
    b = load_config(
        ["--job.config_file", path, "--job.seed", "5", "--optimizer.lr", "2e-4", "--job.description", "x y"]
    )
    assert a == b
    assert a.job.seed == 5 and a.optimizer.lr == 2e-4 and a.job.description == "x y"
    assert load_config(["--parallelism.data_parallel_shard_degree", "-1"]).parallelism.data_parallel_shard_degree == -1


def test_list_parsing(tmp_path):
    cfg = load_config(["--lora.target_modules=q_proj, v_proj", "--profiling.profile_steps=3,4"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.profiling.profile_steps == [3, 4]
    assert load_config(["--profiling.profile_steps="]).profiling.profile_steps == []
    path = write(tmp_path, '[lora]\ntarget_modules = ["o_proj"]\n[profiling]\nmemory_snapshot_steps = [1, 2]\n')
    cfg = load_config(["--job.config_file", path])
    assert cfg.lora.target_modules == ["o_proj"]
    assert cfg.profiling.memory_snapshot_steps == [1, 2]


def test_list_element_type_errors(tmp_path):
    with pytest.raises(ConfigError, match="profiling.profile_steps.*expected int.*'x'"):
        load_config(["--profiling.profile_steps=1,x"])
    path = write(tmp_path, '[profiling]\nprofile_steps = [1, "2"]\n')
    with pytest.raises(ConfigError, match=r"profiling.profile_steps\[1\].*expected int"):
        load_config(["--job.config_file", path])


@pytest.mark.parametrize(
    "raw,expected",
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("Yes", True), ("no", False)],
)
def test_bool_parsing(raw, expected):
    assert load_config([f"--training.compile={raw}"]).training.compile is expected
    assert load_config(["--training.compile", raw]).training.compile is expected


def test_bare_bool_flag():
    cfg = load_config(["--training.compile", "--checkpoint.enable"])
    assert cfg.training.compile is True and cfg.checkpoint.enable is True


def test_bad_bool():
    with pytest.raises(ConfigError, match="training.compile.*expected bool.*'maybe'.*true/false"):
        load_config(["--training.compile=maybe"])


def test_bare_non_bool_needs_value():
    with pytest.raises(ConfigError, match=r"--training.steps needs a value.*--training.steps=VALUE"):
        load_config(["--training.steps"])


def test_unknown_section_cli():
    with pytest.raises(ConfigError) as e:
        load_config(["--traning.steps=3"])
    msg = str(e.value)
    assert "'traning'" in msg and "Did you mean 'training'" in msg and "lr_scheduler" in msg


def test_unknown_section_toml(tmp_path):
    path = write(tmp_path, "[optimzer]\nlr = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--job.config_file", path])
    msg = str(e.value)
    assert "'optimzer'" in msg and "'optimizer'" in msg and path in msg


def test_unknown_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--training.stepz=3"])
    assert "'training.stepz'" in str(e.value) and "Did you mean 'training.steps'" in str(e.value)
    path = write(tmp_path, "[lora]\nrnak = 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--job.config_file", path])
    assert "'lora.rnak'" in str(e.value) and "'lora.rank'" in str(e.value)


def test_wrong_type_cli():
    with pytest.raises(ConfigError) as e:
        load_config(["--training.steps=abc"])
    assert "training.steps" in str(e.value) and "expected int, got 'abc' (str)" in str(e.value)
    with pytest.raises(ConfigError, match="optimizer.lr.*expected float.*'fast'"):
        load_config(["--optimizer.lr=fast"])


def test_wrong_type_toml(tmp_path):
    path = write(tmp_path, '[training]\nsteps = "10"\n')
    with pytest.raises(ConfigError, match=r"training.steps: expected int, got '10' \(str\)"):
        load_config(["--job.config_file", path])
    path = write(tmp_path, "[training]\nsteps = true\n", "b.toml")
    with pytest.raises(ConfigError, match=r"training.steps: expected int, got True \(bool\)"):
        load_config(["--job.config_file", path])
    path = write(tmp_path, "[training]\ncompile = 1\n", "c.toml")
    with pytest.raises(ConfigError, match=r"training.compile: expected bool"):
        load_config(["--job.config_file", path])
    path = write(tmp_path, "training = 3\n", "d.toml")
    with pytest.raises(ConfigError, match=r"'training' must be a table.*\[training\]"):
        load_config(["--job.config_file", path])


@pytest.mark.parametrize(
    "arg,field",
    [
        ("--model.quant_type=int8", "model.quant_type"),
        ("--data.format=csv", "data.format"),
        ("--training.mixed_precision_param=fp8", "training.mixed_precision_param"),
        ("--training.mixed_precision_reduce=bf16", "training.mixed_precision_reduce"),
        ("--training.device=tpu", "training.device"),
        ("--lr_scheduler.decay_type=step", "lr_scheduler.decay_type"),
        ("--parallelism.backend=mpi", "parallelism.backend"),
        ("--activation_checkpoint.mode=partial", "activation_checkpoint.mode"),
        ("--model.synthetic_shape=llama_huge", "model.synthetic_shape"),
    ],
)
def test_invalid_choice(arg, field):
    with pytest.raises(ConfigError) as e:
        load_config([arg])
    msg = str(e.value)
    assert field in msg and repr(arg.split("=", 1)[1]) in msg and "Valid choices" in msg


def test_choice_message_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(["--model.quant_type=nf3"])
    assert "'nf4', 'fp4', 'none'" in str(e.value) and "Did you mean 'nf4'" in str(e.value)
    assert load_config(["--model.synthetic_shape=debug"]).model.synthetic_shape == "debug"
    assert load_config(["--model.synthetic_shape="]).model.synthetic_shape == ""


@pytest.mark.parametrize(
    "arg",
    [
        "--lora.rank=0",
        "--lora.alpha=0",
        "--lora.dropout=1.0",
        "--lora.dropout=-0.1",
        "--data.seq_len=0",
        "--training.steps=-1",
        "--training.micro_batch_size=0",
        "--optimizer.lr=0",
        "--optimizer.lr=nan",
        "--lr_scheduler.warmup_steps=-1",
        "--activation_checkpoint.selective_every=0",
        "--checkpoint.interval=0",
        "--checkpoint.keep_latest_k=-1",
        "--metrics.log_freq=0",
        "--optimizer.lr=-1e-4",
        "--optimizer.lr=inf",
        "--optimizer.beta1=1.0",
        "--optimizer.beta1=-0.1",
        "--optimizer.beta2=1.0",
        "--optimizer.beta2=1.5",
        "--optimizer.beta2=nan",
        "--optimizer.eps=0",
        "--optimizer.eps=-1e-8",
        "--optimizer.eps=inf",
        "--optimizer.weight_decay=-0.01",
        "--optimizer.weight_decay=inf",
        "--optimizer.name=SGD",
        "--optimizer.name=",
        "--lr_scheduler.min_lr_ratio=-0.1",
        "--lr_scheduler.min_lr_ratio=1.5",
        "--training.loss_scale_growth_interval=0",
        "--training.loss_scale_init=0",
        "--training.loss_scale_init=-1024",
        "--training.loss_scale_init=inf",
        "--lora.target_modules=",
        "--lora.target_modules=,",
    ],
)
def test_range_checks(arg):
    name = arg[2:].split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config([arg])
    assert f"{name} must be" in str(e.value) and f"--{name}=" in str(e.value)


def test_range_boundaries_accepted():
    cfg = load_config(
        [
            "--optimizer.beta1=0",
            "--optimizer.beta2=0.0",
            "--optimizer.weight_decay=0",
            "--lr_scheduler.min_lr_ratio=0",
            "--training.loss_scale_growth_interval=1",
            "--lora.target_modules=down_proj",
        ]
    )
    assert cfg.optimizer.beta1 == 0 and cfg.lora.target_modules == ["down_proj"]
    assert load_config(["--lr_scheduler.min_lr_ratio=1"]).lr_scheduler.min_lr_ratio == 1
    # optim.build_optimizer has always accepted any case
    assert load_config(["--optimizer.name=adamw"]).optimizer.name == "adamw"


def test_range_checks_toml(tmp_path):
    # the same checks apply to values from a file, and name the fix
    path = write(tmp_path, "[optimizer]\nname = 'Adam'\n")
    with pytest.raises(ConfigError, match="optimizer.name must be 'AdamW'") as e:
        load_config(["--job.config_file", path])
    assert "--optimizer.name=AdamW" in str(e.value)
    path = write(tmp_path, "[lora]\ntarget_modules = []\n")
    with pytest.raises(ConfigError, match="at least one of") as e:
        load_config(["--job.config_file", path])
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)


def test_build_optimizer_rejects_unknown_name():
    # a config that bypassed validate() still gets a user error (exit 2), not a ValueError traceback
    import torch

    from recipe.optim import build_optimizer

    cfg = load_config([])
    cfg.optimizer.name = "SGD"
    with pytest.raises(ConfigError, match="--optimizer.name=AdamW"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optimizer)
    cfg.optimizer.name = "adamw"
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optimizer), torch.optim.AdamW)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(["--job.config_file", path])
    assert path in str(e.value)


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[training]\nsteps = = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--job.config_file", path])
    msg = str(e.value)
    assert path in msg and "malformed TOML" in msg and "line 2" in msg


@pytest.mark.parametrize("argv", [["positional"], ["--steps=3"], ["-x"]])
def test_bad_override_form(argv):
    with pytest.raises(ConfigError, match=r"--section.key=value"):
        load_config(argv)


def test_dump_toml_round_trip(tmp_path):
    cfg = load_config(
        [
            '--job.description=quote " and \\ and ünïcode 🚀\nnewline',
            "--lora.target_modules=q_proj,o_proj",
            "--profiling.profile_steps=3,4",
            "--optimizer.eps=1e-12",
            "--training.compile",
            "--model.quant_type=fp4",
        ]
    )
    path = write(tmp_path, dump_toml(cfg), "dumped.toml")
    back = load_config(["--job.config_file", path])
    cfg.job.config_file = path
    assert back == cfg
    d = config_to_dict(back)
    assert d["lora"]["target_modules"] == ["q_proj", "o_proj"]
    assert config_from_dict(d) == back
    # the dict must be a copy, not a view into the dataclass
    d["lora"]["target_modules"].append("x")
    assert back.lora.target_modules == ["q_proj", "o_proj"]


def test_default_round_trip(tmp_path):
    path = write(tmp_path, dump_toml(JobConfig()))
    assert load_config(["--job.config_file", path]) == dataclasses.replace(
        JobConfig(), job=dataclasses.replace(JobConfig().job, config_file=path)
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag, capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--training.steps=3", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "[lora]" in out and "--training.global_batch_size" in out
    assert "Exclude prompt tokens from the loss." in out
    assert "'nf4', 'fp4', 'none'" in out and "default: 2048" in out


# ---------------------------------------------------------------------------------------------- the plan


def test_compile_auto_is_resolved_once_with_its_reason():
    """training.compile = 'auto' (the default): on for a CUDA device, off on CPU and where a setting
    excludes compile, each with its reason; explicit true/false win; nothing is compiled here."""
    from recipe.plan import resolve_compile

    cfg = load_config([])
    assert cfg.training.compile == "auto"
    assert resolve_compile(cfg, "cuda").describe() == "training.compile: on (CUDA)"
    cpu = resolve_compile(cfg, "cpu")
    assert not cpu.on and cpu.describe().startswith("training.compile: off (CPU device: inductor's CPU code")
    seg = resolve_compile(load_config(["--model.packed_attention=segments"]), "cuda")
    assert not seg.on and "model.packed_attention = 'segments'" in seg.reason
    pp = load_config(["--parallelism.pipeline_parallel_degree=2", "--parallelism.pipeline_parallel_schedule=DualPipeV"])
    split = resolve_compile(pp, "cuda")
    assert not split.on and "DualPipeV splits the backward" in split.reason
    one_f_one_b = load_config(
        ["--parallelism.pipeline_parallel_degree=2", "--parallelism.pipeline_parallel_schedule=1F1B"]
    )
    assert resolve_compile(one_f_one_b, "cuda").on
    assert resolve_compile(load_config(["--training.compile=true"]), "cpu").on  # explicit: also on CPU
    assert not resolve_compile(load_config(["--training.compile=false"]), "cuda").on
    assert load_config(["--training.compile=auto"]).training.compile == "auto"


def test_compile_true_where_impossible_is_a_config_error():
    from recipe.plan import resolve_compile

    with pytest.raises(ConfigError, match=r"training.compile = true, but .*ZBVZeroBubble splits the backward.*1F1B"):
        resolve_compile(load_config(["--parallelism.pipeline_parallel_degree=2", "--training.compile=true"]), "cuda")
    with pytest.raises(ConfigError, match=r"packed_attention = 'segments'.*--training.compile=false"):
        load_config(["--model.packed_attention=segments", "--training.compile=true"])
    with pytest.raises(ConfigError, match=r"training.compile: invalid value 'maybe'|expected bool or 'auto'"):
        load_config(["--training.compile=maybe"])


def test_plan_resolves_each_decision_once(tmp_path, monkeypatch):
    """resolve_plan: dtypes, offload and pinning, the embedding's place; tied embeddings with
    host_embedding are a config error before loading; compile on turns inductor's caches on in
    TORCHINDUCTOR_CACHE_DIR and says whether it is warm."""
    import dataclasses

    import torch

    from models.shapes import SHAPES
    from recipe.plan import compile_cache, resolve_plan

    shape = SHAPES["debug"]
    cfg = load_config(["--training.mixed_precision_param=float16", "--parallelism.cpu_offload=true"])
    plan = resolve_plan(cfg, torch.device("cpu"), 1, shape)
    assert (plan.param_dtype, plan.reduce_dtype) == (torch.float16, torch.float32)
    assert plan.cpu_offload and not plan.pin_memory and plan.shard_device == torch.device("cpu")
    assert plan.embedding == "fsdp" and not plan.compile
    vocab = load_config(["--parallelism.vocab_parallel_embedding=true"])
    assert resolve_plan(vocab, torch.device("cpu"), 2, shape).embedding == "vocab_sharded"
    assert resolve_plan(vocab, torch.device("cpu"), 1, shape).embedding == "fsdp"
    tied = dataclasses.replace(shape, tie_word_embeddings=True)
    assert resolve_plan(vocab, torch.device("cpu"), 2, tied).embedding == "tied"
    host = load_config(["--parallelism.host_embedding=true"])
    assert resolve_plan(host, torch.device("cpu"), 1, shape).embedding == "host"
    with pytest.raises(ConfigError, match="host_embedding.*ties lm_head.*--parallelism.host_embedding=false"):
        resolve_plan(host, torch.device("cpu"), 1, tied)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert compile_cache() == (str(tmp_path / "inductor"), 0)
    (tmp_path / "inductor" / "fxgraph" / "ab").mkdir(parents=True)
    assert compile_cache() == (str(tmp_path / "inductor"), 1)


def test_cuda_graph_mode_refuses_activation_checkpointing():
    """training.compile_mode = 'reduce-overhead' (CUDA graphs) with activation checkpointing stopped the
    step on an H100 (a replay overwrote outputs the recompute still used): one message naming both keys
    and the fixes, before anything is loaded; with or without activation offload."""
    for extra in ([], ["--activation_checkpoint.offload=true"]):
        for mode in ("full", "selective"):
            with pytest.raises(ConfigError, match=f"compile_mode.*'{mode}'.*mode=none.*compile_mode=default"):
                load_config(["--training.compile_mode=reduce-overhead", f"--activation_checkpoint.mode={mode}", *extra])
    cfg = load_config(["--training.compile_mode=reduce-overhead", "--activation_checkpoint.mode=none"])
    assert cfg.training.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(["--training.compile_mode=fast"])


def test_auto_memory_savers_are_on_only_where_measured():
    """parallelism.host_embedding and activation_checkpoint.offload = 'auto' (the defaults): on for one
    CUDA rank without FSDP (where the H100 run measured them: BENCHMARKS.md 2026-12-07), off on CPU, for
    several ranks, where FSDP runs one rank, with tied embeddings, without checkpointing; an explicit
    value is kept; the plan and the estimator take the same decisions; the reason is logged."""
    import dataclasses

    import torch

    import recipe.estimate as E
    from models.shapes import SHAPES
    from recipe.plan import resolve_ac_offload, resolve_host_embedding, resolve_plan

    full = ["--activation_checkpoint.mode=full"]
    cfg = load_config(full)
    assert (cfg.parallelism.host_embedding, cfg.activation_checkpoint.offload) == ("auto", "auto")

    def both(args, device="cuda", world=1, tied=False):
        c = load_config(args)
        return resolve_host_embedding(c, device, world, tied).on, resolve_ac_offload(c, device, world).on

    assert both(full) == (True, True)
    assert both(full, device="cpu") == (False, False)
    assert both(full, world=2) == (False, False)
    for fsdp in ("--parallelism.cpu_offload=true", "--parallelism.single_rank_fsdp=true"):
        assert both([*full, fsdp]) == (False, False)
    assert both([*full, "--training.mixed_precision_reduce=float64"]) == (False, False)
    assert both([*full], tied=True) == (False, True)
    assert both([]) == (True, False)  # activation_checkpoint.mode = 'none': nothing to offload
    explicit = [*full, "--parallelism.host_embedding=false", "--activation_checkpoint.offload=true"]
    assert both(explicit, device="cpu", world=2) == (False, True)
    why = resolve_host_embedding(load_config(full), "cuda", 2, False)
    assert why.describe() == "parallelism.host_embedding: off (2 ranks: measured on one rank only so far)"

    shape = SHAPES["debug"]
    plan = resolve_plan(cfg, torch.device("cuda"), 1, shape, world_size=1)
    assert plan.embedding == "host" and plan.ac_offload and not plan.fsdp
    plan = resolve_plan(cfg, torch.device("cpu"), 1, shape, world_size=1)
    assert plan.embedding == "fsdp" and not plan.ac_offload
    tied = dataclasses.replace(shape, tie_word_embeddings=True)
    assert resolve_plan(cfg, torch.device("cuda"), 1, tied, world_size=1).embedding == "tied"

    cfg8 = load_config(["--job.config_file", "train_configs/llama3_8b_qlora.toml", "--model.checkpoint=/nonexistent/x"])
    one, two = E._job(cfg8, 1), E._job(cfg8, 2)
    assert (one.host_embedding, one.act_offload, one.fsdp) == (True, True, False)
    assert (two.host_embedding, two.act_offload, two.fsdp) == (False, False, True)
