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

