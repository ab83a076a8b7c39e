import pytest

from epmq import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_supported_bits(bits):
    assert QuantSpec(bits=bits).maxq == 2**bits - 1


@pytest.mark.parametrize("bits", [0, 1, 5, 16, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, 1.5, None])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=group_size)


def test_groups_of_an_input_width():
    spec = QuantSpec(group_size=128)
    assert spec.n_groups(768) == 6
    assert QuantSpec(group_size=-1).n_groups(100) == 1
    # SigLIP-so400m's MLP input, 4304 = 33 x 128 + 80: a shorter last group
    assert spec.n_groups(4304) == 34 and spec.n_groups(100) == 1


@pytest.mark.parametrize("flag", ["sym", "act_order", "static_groups"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_booleans(flag, value):
    """(YAML's sym: 'no', quoted, would otherwise be a truthy string: a symmetric grid.)"""
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        QuantSpec(**{flag: value})



def test_numpys_integers_and_bools_are_taken_as_pythons():
    """A sweep's values read from numpy arrays (bits=np.int64(4), sym=np.True_), which gptq_solve
    and find_params take since 57de0a5, were refused as 'bits must be one of (2, 3, 4, 8)'; taken,
    and held as Python's int and bool (the spec's dict is written to quantize_config.json)."""
    import json

    import numpy as np

    spec = QuantSpec(bits=np.int64(4), group_size=np.int32(128), sym=np.True_, act_order=np.bool_(False),
                     static_groups=np.False_)
    assert spec == QuantSpec(bits=4, group_size=128, sym=True)
    assert [type(v) for v in spec.to_dict().values()] == [int, int, bool, bool, bool]
    assert json.loads(json.dumps(spec.to_dict())) == QuantSpec(bits=4, group_size=128, sym=True).to_dict()
    for bad in (np.float64(4.0), np.bool_(True)):
        with pytest.raises(ValueError, match="bits"):
            QuantSpec(bits=bad)
    with pytest.raises(ValueError, match="sym must be True or False"):
        QuantSpec(sym=np.int64(1))
