"""Name -> building block, plus how the builder feeds it; the one place a YAML module name is looked up.

A YAML row `[from, repeats, module, args]` names its module by the key it was registered under (the class
name). Each entry says how the builder calls it, so the builder has no branch per module type:

- `channels`: what the row's output channel count is and how the constructor receives it
    - "arg0": args[0] is the output channel count, scaled by `width_multiple` and made divisible by 8;
      called as `factory(c_in, c_out, *args[1:])`.
    - "same": output channels = input channels; called as `factory(c_in, *args)` (attention rows, Upsample).
    - "sum": output channels = sum of the inputs' channels; called as `factory(c_ins, *args)` (Concat).
    - "none": the row produces no feature map (the Detect head); called as `factory(c_ins, *args)`.
- `multi_input`: `c_in` is a list with one channel count per `from` index (else exactly one input).
- `repeats`: the (depth-scaled) repeat count is passed as the argument after `c_out` instead of stacking copies.
- `attention` / `attention_at`: the file's `attention:` / `attention_at:` keys are passed as keywords.
- `adapt_args`: rewrites a row's args before the call (aliases such as `nn.Upsample`); may raise ValueError.

Registering a module is one decorator: `@register_module(channels="arg0", repeats=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from torch import nn

from detector.errors import did_you_mean

T = TypeVar("T")
ChannelRule = Literal["arg0", "same", "sum", "none"]


class UnknownNameError(LookupError):
    """A name that is not in a registry; `str()` is the one-line message with a close match, if any."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> entry map where registering a name twice is an error and a miss suggests a close name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            names = self.names()
            raise UnknownNameError(f"unknown {self.kind} '{name}'{did_you_mean(name, names)}; "
                                   f"valid: {', '.join(names)}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class RowModule:
    """How the builder turns a row into a module (see the module docstring for each field)."""

    name: str
    factory: Callable[..., nn.Module]
    channels: ChannelRule = "arg0"
    multi_input: bool = False
    repeats: bool = False
    attention: bool = False
    attention_at: bool = False
    adapt_args: Callable[[list], list] | None = None


MODULES: Registry[RowModule] = Registry("module")


def register_module(
    name: str | None = None,
    *,
    channels: ChannelRule = "arg0",
    multi_input: bool = False,
    repeats: bool = False,
    attention: bool = False,
    attention_at: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator: make `factory` available to YAML rows under `name` (default: its `__name__`)."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        MODULES.add(key, RowModule(key, factory, channels, multi_input, repeats, attention, attention_at))
        return factory

    return decorate


def register_alias(alias: str, target: str, adapt_args: Callable[[list], list] | None = None) -> None:
    """Accept `alias` as another YAML name of `target`, optionally rewriting the row's args first."""
    entry = MODULES.get(target)
    MODULES.add(
        alias,
        RowModule(alias, entry.factory, entry.channels, entry.multi_input, entry.repeats, entry.attention,
                  entry.attention_at, adapt_args),
    )
