import pytest

from prunekit.core.patterns import SparsityPattern, check_sparsity
from prunekit.errors import PrunekitError


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), (" 4 : 8 ", 4, 8), ("1:16", 1, 16)])
def test_parse_nm(text, n, m):
    pattern = SparsityPattern.parse(text)
    assert (pattern.n, pattern.m) == (n, m)
    assert pattern.is_nm
    assert pattern.sparsity == pytest.approx(1 - n / m)


@pytest.mark.parametrize("text", [None, "", "unstructured", "none"])
def test_parse_unstructured(text):
    assert not SparsityPattern.parse(text).is_nm


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "1:1"])
def test_malformed_patterns_are_refused(text):
    with pytest.raises(PrunekitError, match="malformed pattern"):
        SparsityPattern.parse(text)


def test_width_must_be_a_multiple_of_m():
    SparsityPattern.parse("2:4").check_width("layer", 576)
    with pytest.raises(PrunekitError, match="not a multiple of 8"):
        SparsityPattern.parse("4:8").check_width("model.layers.0.mlp.down_proj", 1540)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "abc"])
def test_sparsity_range(value):
    with pytest.raises(PrunekitError, match="sparsity"):
        check_sparsity(value)


def test_sparsity_accepts_zero():
    assert check_sparsity(0) == 0.0
