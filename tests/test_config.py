"""``RotateKConfig``: every bad option is refused in one line that names it; good ones are frozen."""

import dataclasses
import math

import pytest

from rotatek_compile import RotateKConfig
from rotatek_compile.config import KERNELS, METHODS, SOLVERS, SPANS

# option → values it must refuse (one table drives the parametrize matrix)
BAD_VALUES = {
    "key_channels": [0, -1, 1.5, True, "8", float("nan")],
    "key_keep_ratio": [0, 0.0, -0.25, 1.5, float("nan"), float("inf"), True, "0.5"],
    "query_aware": [1, 0, "yes", None],
    "query_window": [0, -3, 2.0, True, "32", None],
    "solver": ["bogus", "EIGH", "", None, 1, "eigh\nsubspace"],
    "subspace_iters": [0, -1, 1.5, False, None],
    "span": ["image", "VISUAL", None],
    "kernel": ["cuda", "Triton", None],
    "method": ["bogus", "RotateK", "snapkv", None],
    "token_keep": [0, 0.0, 1.01, -0.5, float("nan"), float("inf"), False, "1", None],
    "kv_budget": [0, 0.0, 1.01, -0.25, float("nan"), float("inf"), True, "0.5"],
    "group_products": ["yes", 1, 0, None],
}
CASES = [(option, value) for option, values in BAD_VALUES.items() for value in values]
CHOICES = {"solver": SOLVERS, "span": SPANS, "kernel": KERNELS, "method": METHODS}


def _field_names():
    return {field.name for field in dataclasses.fields(RotateKConfig)}


def test_table_covers_every_option():
    assert set(BAD_VALUES) == _field_names()


@pytest.mark.parametrize("option, value", CASES, ids=[f"{o}={v!r}" for o, v in CASES])
@pytest.mark.parametrize("build", ["init", "from_options"])
def test_bad_value_is_a_one_line_error_naming_the_option(option, value, build):
    with pytest.raises(ValueError) as info:
        if build == "init":
            RotateKConfig(**{option: value})
        else:
            RotateKConfig.from_options({option: value})
    message = str(info.value)
    assert "\n" not in message
    assert option in message
    for choice in CHOICES.get(option, ()):
        assert repr(choice) in message  # the allowed values are listed


def test_key_channels_and_ratio_are_exclusive():
    with pytest.raises(ValueError) as info:
        RotateKConfig(key_channels=8, key_keep_ratio=0.5)
    message = str(info.value)
    assert "\n" not in message and "key_channels" in message and "key_keep_ratio" in message


@pytest.mark.parametrize("name", ["key_chanels", "inner", "rank", "Solver"])
def test_unknown_option_is_rejected_listing_known_ones(name):
    with pytest.raises(ValueError) as info:
        RotateKConfig.from_options({name: 1})
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    assert all(field in message for field in _field_names() | {"inner", "mode"})


def test_triton_kernel_without_cuda_is_a_one_line_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as info:
        RotateKConfig(kernel="triton")
    message = str(info.value)
    assert "\n" not in message and "kernel='triton'" in message and "CUDA" in message
    assert RotateKConfig(kernel="auto").kernel == "auto"  # resolved per device, never refused


@pytest.mark.parametrize("options, named", [
    ({"inner": "aot"}, "inner"), ({"mode": "fast"}, "mode"), ({"solver": "x"}, "solver")])
def test_backend_object_checks_options_at_once(options, named):
    import rotatek_compile

    with pytest.raises(ValueError) as info:
        rotatek_compile.backend(**options)
    assert "\n" not in str(info.value) and named in str(info.value)


def test_backend_object_takes_mode_with_options():
    import rotatek_compile

    backend = rotatek_compile.backend(key_channels=8, mode="reduce-overhead")
    assert backend.mode == "reduce-overhead" and backend.config.key_channels == 8


def test_from_options_defaults_and_values():
    assert RotateKConfig.from_options(None) == RotateKConfig()
    assert RotateKConfig.from_options({}) == RotateKConfig()
    config = RotateKConfig.from_options({"key_channels": 8, "solver": "subspace", "query_aware": False,
                                         "span": "prompt", "kernel": "reference", "method": "think",
                                         "token_keep": 0.5, "query_window": 16, "subspace_iters": 3})
    assert config == RotateKConfig(key_channels=8, solver="subspace", query_aware=False, span="prompt",
                                   kernel="reference", method="think", token_keep=0.5, query_window=16,
                                   subspace_iters=3)


def test_defaults_follow_the_paper():
    # the basis: the paper's query-aware one or K-only PCA, per head, whichever the window prefers
    config = RotateKConfig()
    assert (config.query_aware, config.query_window, config.solver, config.kernel, config.method,
            config.token_keep, config.span) == ("auto", 32, "auto", "auto", "rotatek", 1.0, "visual")


def test_auto_solver_is_exact_on_cpu_and_subspace_on_cuda():
    import torch

    assert RotateKConfig().solver_for(torch.device("cpu")) == "eigh"
    assert RotateKConfig().solver_for(torch.device("cuda")) == "subspace"
    assert RotateKConfig(solver="eigh").solver_for(torch.device("cuda")) == "eigh"
    assert RotateKConfig(solver="subspace").solver_for(torch.device("cpu")) == "subspace"


@pytest.mark.parametrize("ratio", [1e-6, 0.25, 0.5, 1, 1.0])
def test_good_ratios_are_accepted(ratio):
    assert RotateKConfig(key_keep_ratio=ratio).key_keep_ratio == ratio


@pytest.mark.parametrize("config, head_dim, expected", [
    (RotateKConfig(key_channels=8), 64, 8),
    (RotateKConfig(key_channels=8), 8, 8),
    (RotateKConfig(key_channels=200), 64, 64),  # clipped to head_dim
    (RotateKConfig(key_keep_ratio=0.25), 128, 32),
    (RotateKConfig(key_keep_ratio=0.3), 10, 3),
    (RotateKConfig(key_keep_ratio=0.26), 10, 3),  # rounded up
    (RotateKConfig(key_keep_ratio=1e-6), 64, 1),  # at least one channel
    (RotateKConfig(key_keep_ratio=1.0), 80, 80),
    (RotateKConfig(), 128, 32),  # default ratio 0.25
    (RotateKConfig(), 6, 2),  # ceil(1.5)
])
def test_channels_for(config, head_dim, expected):
    assert config.channels_for(head_dim) == expected


def test_channels_for_is_within_bounds_for_every_ratio():
    for head_dim in (1, 7, 64, 96, 128, 256):
        for step in range(1, 101):
            r = RotateKConfig(key_keep_ratio=step / 100).channels_for(head_dim)
            assert 1 <= r <= head_dim and r == max(1, math.ceil(step / 100 * head_dim))


def test_config_is_frozen_and_hashable():
    config = RotateKConfig(key_channels=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.key_channels = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.solver = "subspace"  # type: ignore[misc]
    assert hash(config) == hash(RotateKConfig(key_channels=8))
    assert dataclasses.replace(config, solver="subspace").solver == "subspace"
    with pytest.raises(ValueError, match="solver"):
        dataclasses.replace(config, solver="bogus")  # validation runs on every construction
