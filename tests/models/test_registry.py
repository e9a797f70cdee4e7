"""detector.models.registry: a name -> entry map that refuses a second registration, lists its names sorted and
answers an unknown (or unhashable) name with one error suggesting a close name."""

from __future__ import annotations

import pytest
from torch import nn

from detector.models import registry
from detector.models.registry import Registry, UnknownNameError


def test_names_are_sorted_counted_and_iterated_in_order() -> None:
    """names() and iteration are sorted, len() counts the entries, and a second registration is refused."""
    reg: Registry[int] = Registry("thing")
    reg.add("beta", 2)
    reg.add("alpha", 1)
    assert reg.names() == ["alpha", "beta"] and list(reg) == ["alpha", "beta"]
    assert len(reg) == 2 and "alpha" in reg and "gamma" not in reg
    with pytest.raises(ValueError, match="thing 'alpha' is registered twice"):
        reg.add("alpha", 3)


def test_an_unknown_or_unhashable_name_is_one_lookup_error() -> None:
    """A YAML row may name its module by a list: that is an unknown name too, not a TypeError."""
    reg: Registry[int] = Registry("module")
    reg.add("Conv", 1)
    with pytest.raises(UnknownNameError, match="unknown module 'Cnov'"):
        reg.get("Cnov")
    with pytest.raises(UnknownNameError, match=r"unknown module '\['Conv'\]'"):
        reg.get(["Conv"])


def test_a_module_registers_under_the_given_name_or_its_class_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_module(name) registers the class under that name; without one, under the class name."""
    monkeypatch.setattr(registry, "MODULES", Registry("module"))

    @registry.register_module("Renamed", channels="same")
    class Block(nn.Identity):
        pass

    @registry.register_module()
    class Other(nn.Identity):
        pass

    assert registry.MODULES.names() == ["Other", "Renamed"]
    assert registry.MODULES.get("Renamed").factory is Block and registry.MODULES.get("Renamed").channels == "same"
