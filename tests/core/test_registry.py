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


def test_build_takes_every_spelling_of_a_method_and_validates_its_settings():
    from pydantic import Field

    from prunekit.core.method import Method

    registry: Registry = Registry("method")

    @registry.register("damped")
    class Damped(Method):
        dampening: float = Field(0.01, gt=0)

    assert Damped.name == "damped"
    for spec in ("damped", {"name": "damped"}, {"damped": None}, {"damped": {}}):
        assert registry.build(spec).settings() == {"name": "damped", "dampening": 0.01}
    assert registry.build({"damped": {"dampening": 0.5}}).dampening == 0.5
    assert registry.build("damped", dampening=0.2).dampening == 0.2
    built = registry.build("damped")
    assert registry.build(built) is built
    with pytest.raises(PrunekitError, match="method damped has no setting 'damping'; its settings are: dampening"):
        registry.build({"name": "damped", "damping": 1})
    with pytest.raises(PrunekitError, match="method damped: dampening: Input should be greater than 0"):
        registry.build({"damped": {"dampening": -1}})
    with pytest.raises(PrunekitError, match="unknown method 'dumped'; choose one of: damped"):
        registry.build("dumped")
    with pytest.raises(PrunekitError, match="a method is a name"):
        registry.build({"damped": 1, "other": 2})


def test_sweep_entries_leave_the_swept_setting_to_the_sweep():
    from prunekit.tokens.base import METHODS

    entries = METHODS.sweep_entries(["tome", {"name": "random"}])
    assert [entry["name"] for entry in entries] == ["tome", "random"]
    assert all("ratio" not in entry for entry in entries)
    for spec in ({"name": "tome", "ratio": 0.2}, {"tome": {"ratio": 0.2}}, {"name": "tome", "rate": 0.2}):
        with pytest.raises(PrunekitError, match="leave ratio out"):
            METHODS.sweep_entries([spec], aliases=("rate",))
    with pytest.raises(PrunekitError, match="tome more than once"):
        METHODS.sweep_entries(["tome", {"name": "tome"}])
