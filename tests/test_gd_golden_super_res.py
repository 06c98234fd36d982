"""fastdiff's super-resolution UNet against guided-diffusion's own numbers (issue 15).

The fixtures (tests/fixtures/gd_super_res_*.pt) were written by tools/gd_golden_classifier.py
from GD commit 22e0df8 (GD's ``sr_create_model`` at 64x64, and GD's ``SuperResModel`` class at
32x32 from a 12x12 low-resolution image). For each, fastdiff's factory (or class) with GD's
arguments must have GD's state_dict keys and shapes, load the state GD was given, and
reproduce GD's output and the gradients of a fixed scalar of it w.r.t. every parameter, the
noisy image x and the low-resolution image (through the bilinear upsampling), for GD's
modules and every kernel backend that runs on the CPU. The checks and tolerances are the
classifier goldens' (tests/test_gd_golden_classifier.py), which are the UNet goldens'.
"""
import pytest
import torch

from test_gd_golden_classifier import (
    BACKENDS,
    _one_thread,  # noqa: F401 (an autouse fixture: one thread, as the generator ran)
    build,
    check_against_gd,
    check_fixture_metadata,
    check_inputs_are_gds,
    check_state_dict_is_gds,
    check_zero_gradients_are_shifts,
    gd_state,
    golden,
    load_fixture,
)


@pytest.fixture(scope="module", params=sorted(golden.SUPER_RES_CONFIGS))
def fixture(request):
    return load_fixture("super_res", request.param)


@pytest.fixture(scope="module")
def state(fixture):
    return gd_state(fixture)


def test_fixture_records_gd(fixture):
    check_fixture_metadata(fixture)
    assert "grad_low_res" in fixture


def test_inputs_are_what_gd_was_given(fixture):
    check_inputs_are_gds(fixture)


def test_state_dict_keys_shapes_and_values_are_gds(fixture, state):
    check_state_dict_is_gds(fixture, state)


def test_only_shifts_before_one_channel_groups_have_zero_gradients(fixture):
    check_zero_gradients_are_shifts(fixture)


@pytest.mark.parametrize("norm_backend,attention_backend", BACKENDS)
def test_outputs_and_gradients_match_gd(fixture, state, norm_backend, attention_backend):
    check_against_gd(fixture, state, norm_backend, attention_backend)


def test_low_res_is_required():
    fixture = load_fixture("super_res", "sr_32_from_12")
    model = build(fixture)
    with pytest.raises(ValueError, match="low_res"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1))
