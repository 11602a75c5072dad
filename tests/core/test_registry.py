import pytest

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError


def test_registry_lookup_is_case_insensitive_and_lists_choices():
    registry: Registry = Registry("thing")

    @registry.register("Alpha")
    class Alpha:
        pass

    assert registry.get("alpha") is Alpha
    assert "ALPHA" in registry
    with pytest.raises(PrunekitError, match="unknown thing 'beta'; choose one of: alpha"):
        registry.get("beta")


def test_double_registration_is_a_bug():
    registry: Registry = Registry("thing")
    registry.register("a")(object)
    with pytest.raises(RuntimeError):
        registry.register("a")(int)


def test_methods_register_themselves():
    from prunekit.weights import METHODS

    assert {"magnitude", "wanda", "sparsegpt"} <= set(METHODS.names())
