"""The strict config loader: shipped configs, unknown keys, parse errors, typed overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfleet.launch.config import (
    ConfigError,
    RunConfig,
    RunSection,
    SamplerConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = ["cartpole_dqn.yaml", "pendulum_sac.yaml", "smoke.yaml"]


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_shipped_configs_load_and_round_trip(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, RunConfig)
    assert parse_config(dump_config(config)) == config


def test_shipped_configs_match_their_algorithms():
    cartpole = load_config(CONFIGS / "cartpole_dqn.yaml")
    assert (cartpole.env.id, cartpole.learner.algorithm) == ("CartPole-v1", "dqn")
    assert cartpole.run.total_frames == 300_000
    assert cartpole.run.target_return == 475
    pendulum = load_config(CONFIGS / "pendulum_sac.yaml")
    assert (pendulum.env.id, pendulum.learner.algorithm) == ("Pendulum-v1", "sac")
    assert pendulum.run.target_return == -200


def test_n_step_with_matching_sequences_loads():
    config = parse_config("learner: {n_step: 3}\nbuffer: {sampler: {type: sequence, length: 3}}")
    assert config.buffer.sampler.to_mapping() == {"type": "sequence", "length": 3}


def test_empty_text_gives_the_defaults():
    assert parse_config("") == RunConfig()


def test_values_are_converted_to_their_field_types():
    config = parse_config(
        "learner: {lr: 1, batch_size: 64}\npolicy: {hidden: [32, 16]}\n"
        "buffer: {sampler: prioritized, capacity: 2GB}\nenv: {kwargs: {max_episode_steps: 50}}\n"
    )
    assert config.learner.lr == 1.0 and isinstance(config.learner.lr, float)
    assert config.learner.batch_size == 64
    assert config.policy.hidden == (32, 16)
    assert config.buffer.sampler == SamplerConfig(type="prioritized")
    assert config.buffer.capacity == "2GB"
    assert config.env.kwargs == {"max_episode_steps": 50}


def test_sampler_mapping_holds_only_its_own_parameters():
    assert SamplerConfig().to_mapping() == {"type": "uniform"}
    assert SamplerConfig("prioritized", alpha=0.7).to_mapping() == {
        "type": "prioritized",
        "alpha": 0.7,
        "beta": 0.4,
    }
    assert SamplerConfig("sequence", length=4).to_mapping() == {"type": "sequence", "length": 4}
    kwargs = parse_config("buffer: {num_shards: 2, rate_limiter: {min_size_to_sample: 7}}").buffer.service_kwargs()
    assert kwargs["num_shards"] == 2
    assert kwargs["rate_limiter"] == {
        "min_size_to_sample": 7,
        "samples_per_insert": None,
        "error_margin": 0.0,
        "timeout_s": 60.0,
    }


BAD_TEXT = [
    ("unknown_top", "lerner: {lr: 1}", r"unknown key 'lerner'; did you mean 'learner'\?"),
    ("unknown_nested", "learner: {batchsize: 3}", r"unknown key 'learner.batchsize'; did you mean 'learner.batch_size'\?"),
    ("unknown_deep", "collector: {exploration: {sigmaa: 1}}", r"'collector.exploration.sigmaa'; did you mean 'collector.exploration.sigma'"),
    ("unknown_far", "run: {zzz: 1}", r"unknown key 'run.zzz'; valid keys in 'run': dir, learner_steps_per_frame"),
    ("wrong_type", "learner: {batch_size: many}", r"learner.batch_size: expected int, got 'many' \(str\)"),
    ("bool_for_int", "seed: true", r"seed: expected int, got True \(bool\)"),
    ("section_scalar", "learner: 3", r"learner: expected mapping, got 3 \(int\)"),
    ("out_of_range", "learner: {gamma: 1.5}", r"learner.gamma: 1.5 must be in \[0, 1\]"),
    ("bad_choice", "learner: {algorithm: ppo}", r"learner.algorithm: 'ppo' is not one of 'dqn', 'sac'"),
    ("collector_check", "env: {num_envs: 0}", r"env.num_envs = 0: must be an integer >= 1"),
    ("bad_capacity", "buffer: {capacity: lots}",
     r"buffer.capacity: 'lots': not a row count or a size; write e.g. 1000000, '500GB' or '2TiB'"),
    ("bad_name", "name: ../x", r"^<string>: name = '../x': use 1-64 letters, digits, '_', '.' or '-'"),
    ("bad_namespace", "ray: {namespace: 'a b'}", r"^<string>: ray.namespace = 'a b': use 1-64 letters"),
    ("bad_sampler_value", "buffer: {sampler: {type: prioritized, alpha: -1}}",
     r"^<string>: buffer.sampler.alpha=-1.0: must be a finite number >= 0 \(default 0.6\)$"),
    ("unused_sampler_value", "buffer: {sampler: {length: 0}}", r"buffer.sampler.length=0: must be an integer >= 1"),
    ("bad_limiter_value", "buffer: {rate_limiter: {timeout_s: 0}}",
     r"^<string>: buffer.rate_limiter.timeout_s=0.0: must be a number of seconds > 0$"),
    ("bad_durability", "buffer: {durability: disk}", r"buffer.durability: 'disk' is not one of 'process', 'fsync'"),
    ("n_step_without_sequences", "learner: {n_step: 3}",
     r"learner.n_step: 3 needs slices of 3 rows, but buffer.sampler is \{'type': 'uniform'\}; "
     r"set buffer.sampler.n_step: \{n: 3\} \(n-step rebuilt at sample time, with any sampler\) or "
     r"buffer.sampler to \{type: sequence, length: 3\}"),
    ("n_step_twice", "learner: {n_step: 3}\nbuffer: {sampler: {type: uniform, n_step: {n: 3}}}",
     r"learner.n_step: 3 and buffer.sampler.n_step both ask for n-step returns; keep buffer.sampler.n_step"),
    ("n_step_gamma_differs", "learner: {gamma: 0.9}\nbuffer: {sampler: {type: prioritized, n_step: {n: 3, gamma: 0.99}}}",
     r"buffer.sampler.n_step.gamma: 0.99 differs from learner.gamma: 0.9; .* leave n_step.gamma out"),
    ("n_step_zero", "buffer: {sampler: {type: uniform, n_step: {n: 0}}}",
     r"buffer.sampler.n_step.n=0: must be an integer >= 1 \(steps per return\), e.g. 3"),
    ("n_step_typo", "buffer: {sampler: {type: uniform, n_step: {n: 3, gama: 0.9}}}",
     r"unknown key 'buffer.sampler.n_step.gama'; did you mean 'buffer.sampler.n_step.gamma'\?"),
    ("top_list", "- 1\n- 2", r"the top level must be a mapping of sections, got list"),
    ("syntax", "learner:\n  lr: [1,\n  gamma: 2\n",
     r"^<string>:2:7: this list is never closed with '\]' \(the line reads 'lr: \[1,'\)$"),
    ("bad_indent", "learner:\n  lr: 1\n gamma: 2\n",
     r"^<string>:3:2: this line does not line up with the lines above it: check its indentation "
     r"\(the line reads 'gamma: 2'\)$"),
    ("key_without_colon", "name: x\nseed: 0\nenv:\n  id CartPole-v1\n  num_envs: 4\n",
     r"^<string>:4:3: this line is not 'key: value': the ':' after the key is missing "
     r"\(the line reads 'id CartPole-v1'\)$"),
    ("last_key_without_colon", "learner:\n  lr: 0.1\n  batch_size 64\n",
     r"^<string>:3:3: this line is not 'key: value': the ':' after the key is missing "
     r"\(the line reads 'batch_size 64'\)$"),
    ("open_quote", "name: 'x\nseed: 0\n", r"^<string>:1:7: this quote is never closed \(the line reads \"name: 'x\"\)$"),
    ("tab", "env:\n\tid: CartPole-v1\n",
     r"^<string>:2:1: a tab character: indent with spaces \(the line reads 'id: CartPole-v1'\)$"),
    ("colon_in_value", "name: x: y\n",
     r"^<string>:1:8: a ': ' inside a value: put the value in quotes \(the line reads 'name: x: y'\)$"),
    ("yaml_tag", "name: !!python/object:os.system x\n",
     r"^<string>:1:7: a YAML tag \(!!\.\.\.\) is not allowed in a config: write the plain value"),
    ("indented_under_value", "learner:\n  lr: 0.1\n    gamma: 0.9\n",
     r"^<string>:3:5: this key is indented more than the key above it, which already has a value "
     r"\(the line reads 'gamma: 0.9'\)$"),
    ("duplicate", "seed: 1\nname: a\nseed: 2\n", r"<string>:3:1: duplicated key 'seed' \(first on line 1\)"),
    ("runtime_env_list", "ray: {runtime_env: [pip]}", r"ray.runtime_env: expected mapping \| null, got \['pip'\] \(list\)"),
    ("wandb_project", "run: {wandb: {project: team/runs}}",
     r"run.wandb.project: 'team/runs' is not a W&B project name; use 1-128 characters without"),
    ("wandb_tag", "run: {wandb: {tags: ['']}}", r"run.wandb.tags\[0\]: '' is not a W&B tag; use a string of 1-64 characters"),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in BAD_TEXT], ids=[c[0] for c in BAD_TEXT])
def test_bad_config_text_is_refused(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(text)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(missing)


def test_parse_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nlearner: {lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:2:10: this mapping is never closed with '\}'"):
        load_config(path)


GOOD_OVERRIDES = [
    ("learner.lr=1e-3", lambda c: c.learner.lr == 0.001),
    ("learner.batch_size=1e3", lambda c: c.learner.batch_size == 1000),
    ("policy.hidden=[128, 128]", lambda c: c.policy.hidden == (128, 128)),
    ("env.kwargs.max_episode_steps=200", lambda c: c.env.kwargs == {"max_episode_steps": 200}),
    ("buffer.sampler=prioritized", lambda c: c.buffer.sampler.type == "prioritized"),
    ("buffer.sampler.alpha=0.5", lambda c: c.buffer.sampler.alpha == 0.5),
    ("run.target_return=null", lambda c: c.run.target_return is None),
    ("ray.address=auto", lambda c: c.ray.address == "auto"),
    ("learner.double_dqn=false", lambda c: c.learner.double_dqn is False),
    ("name=my-run", lambda c: c.name == "my-run"),
    ("buffer.capacity=10GB", lambda c: c.buffer.capacity == "10GB"),
    # the buffer's capacity grammar, whole: e-notation and underscores are row counts
    ("buffer.capacity=1e6", lambda c: c.buffer.capacity == "1e6"),
    ("buffer.capacity=1_000GB", lambda c: c.buffer.capacity == "1_000GB"),
    ("ray.namespace=team-a", lambda c: c.ray.namespace == "team-a"),
    ("learner.sample_split=rows", lambda c: c.learner.sample_split == "rows"),
    ("run.loggers=[tensorboard, wandb]", lambda c: c.run.loggers == ("tensorboard", "wandb")),
    ("run.wandb.mode=offline", lambda c: c.run.wandb.mode == "offline"),
    ("run.wandb.tags=[a, b]", lambda c: c.run.wandb.tags == ("a", "b")),
    ("ray.runtime_env={env_vars: {A: '1'}}", lambda c: c.ray.runtime_env == {"env_vars": {"A": "1"}}),
    # a key inside a mapping that is still null starts it
    ("ray.runtime_env.env_vars.A=1", lambda c: c.ray.runtime_env == {"env_vars": {"A": "1"}}),
]


@pytest.mark.parametrize("override,check", GOOD_OVERRIDES, ids=[c[0] for c in GOOD_OVERRIDES])
def test_overrides_apply_typed_values(override, check):
    base = RunConfig(run=RunSection(target_return=100.0))
    assert not check(base)
    assert check(apply_overrides(base, [override]))


def test_later_overrides_win_and_file_values_are_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner: {lr: 0.1, batch_size: 32}\n")
    config = load_config(path, ["learner.lr=0.2", "learner.lr=0.3"])
    assert (config.learner.lr, config.learner.batch_size) == (0.3, 32)


BAD_OVERRIDES = [
    ("no_equals", "learner.lr", r"expected KEY=VALUE with a dotted key"),
    ("empty_part", "learner..lr=1", r"empty part in key 'learner..lr'"),
    ("unknown", "learner.batchsize=3", r"unknown key 'learner.batchsize'; did you mean 'learner.batch_size'\?"),
    ("wrong_type", "learner.batch_size=abc", r"learner.batch_size: expected int, got 'abc' \(str\)"),
    ("float_for_int", "seed=1.5", r"seed: expected int, got 1.5 \(float\)"),
    ("into_leaf", "learner.lr.x=1", r"'learner.lr' is a float, it has no key 'x'"),
    ("bad_value", "collector.exploration.start=2", r"collector.exploration.start = 2.0: must be a number in"),
    ("bad_choice", "buffer.sampler.type=bad", r"buffer.sampler.type: 'bad' is not one of"),
    ("bad_split", "learner.sample_split=sideways", r"learner.sample_split: 'sideways' is not one of 'whole', 'rows'"),
    ("list_for_int", "learner.n_step=[1]", r"learner.n_step: expected int, got \[1\] \(list\)"),
    # one capacity grammar, the buffer's: what a YAML file or ReplayBuffer.create refuses,
    # an override refuses too
    ("bad_capacity", "buffer.capacity=lots", r"buffer.capacity: 'lots': not a row count or a size"),
    ("bad_limiter_value", "buffer.rate_limiter.samples_per_insert=-2",
     r"buffer.rate_limiter.samples_per_insert=-2.0: must be a finite number > 0"),
    ("bad_namespace", "ray.namespace=../up", r"ray.namespace = '../up': use 1-64 letters"),
    ("connect_timeout", "ray.connect_timeout_s=0", r"ray.connect_timeout_s: 0.0 must be > 0"),
    ("runtime_env_scalar", "ray.runtime_env=3", r"ray.runtime_env: expected mapping \| null, got 3 \(int\)"),
    ("unknown_logger", "run.loggers=[mlflow]", r"run.loggers\[0\]: 'mlflow' is not one of 'tensorboard', 'wandb'"),
    ("wandb_mode", "run.wandb.mode=cloud", r"run.wandb.mode: 'cloud' is not one of 'online', 'offline', 'disabled'"),
]


@pytest.mark.parametrize("override,match", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_overrides_are_refused_naming_the_override(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        apply_overrides(RunConfig(), [override])
    assert str(info.value).startswith(f"override {override!r}")


def test_overrides_may_be_a_mapping_of_python_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner: {lr: 0.1, batch_size: 32}\n")
    config = load_config(path, {"learner.lr": 1e-3, "policy.hidden": [128, 128], "buffer.capacity": "8GB",
                                "env.kwargs.max_episode_steps": 200, "ray.address": None})
    assert (config.learner.lr, config.learner.batch_size) == (0.001, 32)
    assert config.policy.hidden == (128, 128) and config.buffer.capacity == "8GB"
    assert config.env.kwargs == {"max_episode_steps": 200} and config.ray.address is None
    with pytest.raises(ConfigError) as info:
        load_config(path, {"learner.lr": "fast"})
    assert str(info.value) == "override \"learner.lr='fast'\": learner.lr: expected float, got 'fast' (str)"
    with pytest.raises(ConfigError) as info:
        load_config(path, "learner.lr=1")
    assert str(info.value) == ("overrides 'learner.lr=1': give a list of KEY=VALUE strings or a mapping, "
                               "not one string")


def test_ray_section_holds_the_connect_bound_and_a_policy_factory_loads():
    config = parse_config("ray: {address: auto, connect_timeout_s: 5}\n"
                          "policy: {type: 'my_nets:make_q', kwargs: {width: 16}}\n")
    assert (config.ray.address, config.ray.connect_timeout_s) == ("auto", 5.0)
    assert (config.policy.type, dict(config.policy.kwargs)) == ("my_nets:make_q", {"width": 16})
    assert parse_config(dump_config(config)) == config


def test_choices_and_buffer_checks_hold_for_configs_built_in_python():
    from rlfleet.launch.config import BufferConfig, LearnerConfig, RateLimiterConfig

    with pytest.raises(ConfigError, match=r"^algorithm: 'ppo' is not one of 'dqn', 'sac'$"):
        LearnerConfig(algorithm="ppo")
    with pytest.raises(ConfigError, match=r"^placement: 'far' is not one of 'spread', 'pack'$"):
        BufferConfig(placement="far")
    with pytest.raises(ConfigError, match=r"^min_size_to_sample=-1: must be an int >= 0$"):
        RateLimiterConfig(min_size_to_sample=-1)
    with pytest.raises(ConfigError, match=r"^beta=-0.5: must be a finite number >= 0"):
        SamplerConfig("uniform", beta=-0.5)


def test_the_limiter_section_is_the_buffers_spec_with_the_runs_default():
    from rlfleet.buffer.rate_limiter import RateLimiterSpec
    from rlfleet.launch.config import RateLimiterConfig

    limiter = parse_config("buffer: {rate_limiter: {samples_per_insert: 4}}").buffer.rate_limiter
    assert isinstance(limiter, RateLimiterSpec) and limiter.min_size_to_sample == 5000
    assert RateLimiterSpec.from_mapping(limiter.to_mapping()).samples_per_insert == 4.0
    assert RateLimiterConfig().to_mapping() == {**RateLimiterSpec().to_mapping(), "min_size_to_sample": 5000}


def test_ray_runtime_env_is_a_mapping_ray_checks_before_the_run_starts():
    from rlfleet.launch.config import RayConfig
    from rlfleet.launch.preflight import check_runtime_env

    text = "ray: {runtime_env: {env_vars: {OMP_NUM_THREADS: '1'}, pip: [tqdm]}}\n"
    config = parse_config(text)
    assert config.ray.runtime_env == {"env_vars": {"OMP_NUM_THREADS": "1"}, "pip": ["tqdm"]}
    assert parse_config(dump_config(config)) == config and RunConfig().ray.runtime_env is None
    check_runtime_env(config)
    with pytest.raises(ConfigError, match=r"^runtime_env: \['pip'\] is not a mapping of Ray runtime_env fields"):
        RayConfig(runtime_env=["pip"])
    # numbers in env_vars are written as Ray takes them, strings
    assert parse_config("ray: {runtime_env: {env_vars: {N: 1, X: 0.5}}}").ray.runtime_env == {"env_vars": {"N": "1", "X": "0.5"}}
    # the loader takes any mapping; Ray's own check refuses what ray.init would, before anything starts
    with pytest.raises(ConfigError, match=r"^ray.runtime_env: runtime_env\['env_vars'\] must be of type Dict\[str, str\]"):
        check_runtime_env(parse_config("ray: {runtime_env: {env_vars: {OMP_NUM_THREADS: [1]}}}"))
    with pytest.raises(ConfigError, match=r"^ray.runtime_env: runtime_env\['pip'\] must be of type str or List\[str\]"):
        check_runtime_env(parse_config("ray: {runtime_env: {pip: 3}}"))


def test_loggers_and_their_wandb_settings_round_trip_and_hold_in_python():
    from rlfleet.launch.config import WandbConfig

    config = parse_config("run: {loggers: [wandb, tensorboard], wandb: {mode: offline, entity: team, tags: [a]}}")
    assert config.run.loggers == ("wandb", "tensorboard") and config.run.wandb.tags == ("a",)
    assert parse_config(dump_config(config)) == config
    assert RunConfig().run.loggers == () and RunConfig().run.wandb == WandbConfig()
    assert RunSection(loggers=["tensorboard"]).loggers == ("tensorboard",)
    with pytest.raises(ConfigError, match=r"^loggers\[0\]: 'tb' is not one of 'tensorboard', 'wandb'$"):
        RunSection(loggers=("tb",))
    with pytest.raises(ConfigError, match=r"^loggers: 'wandb' is not a list; write e.g. \[tensorboard, wandb\]"):
        RunSection(loggers="wandb")
    with pytest.raises(ConfigError, match=r"^mode: 'cloud' is not one of 'online', 'offline', 'disabled'$"):
        WandbConfig(mode="cloud")
