"""One protocol for every tap on a model's modules.

A tap registers its hooks through one `Handles` object, and `hooked` is the context manager
that removes every one of them on exit, whether the pass finished or raised. Hooks are plain
functions closing over the caller's own containers, never over the `Handles`, so a tap holds no
reference back to itself. What a tap must drop when it ends (for example an output tensor
whose gradient hook refers back to the tap) is registered with `Handles.on_exit`, which runs
after the handles are removed: no cycle outlives the pass and no batch's autograd graph waits
for the cyclic garbage collector. `forward_until` is the early exit (the rest of the network
is not run) that feature visualisation and layer-input capture share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Kind = Literal["forward", "forward_pre"]


class StopForward(Exception):
    """Raised by a hook that has what it needs: the rest of the forward pass is skipped."""


class Handles:
    """The removable handles of one tap, removed together (and at most once)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._on_exit: list[Callable[[], None]] = []

    def register(self, module: nn.Module, hook: Callable[..., Any], kind: Kind = "forward") -> None:
        if kind == "forward":
            self._handles.append(module.register_forward_hook(hook))
        elif kind == "forward_pre":
            self._handles.append(module.register_forward_pre_hook(hook))
        else:
            raise ValueError(f"kind must be 'forward' or 'forward_pre', got {kind!r}")

    def on_exit(self, release: Callable[[], None]) -> None:
        """Run ``release`` when the tap ends, after its hooks are removed."""
        self._on_exit.append(release)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._on_exit:
            self._on_exit.pop()()

    def __len__(self) -> int:
        return len(self._handles)


@contextlib.contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Callable[..., Any]]] = (), kind: Kind = "forward") -> Iterator[Handles]:
    """Register ``(module, hook)`` pairs for the ``with`` block; all are removed when it ends.
    More hooks (of either kind) can be registered on the yielded `Handles`."""
    handles = Handles()
    try:
        for module, hook in hooks:
            handles.register(module, hook, kind)
        yield handles
    finally:
        handles.remove()


def forward_until(model: nn.Module, module: nn.Module, batch: Tensor, kind: Kind = "forward",
                  name: str | None = None) -> Any:
    """Run ``model`` on ``batch`` only as far as ``module``'s first call and return what it saw:
    its output ("forward") or its positional inputs ("forward_pre", before any padding the
    module applies itself). Raises RuntimeError when the forward pass never calls it."""
    seen: list[Any] = []

    def after(_module: nn.Module, _args: tuple, output: Any) -> None:
        seen.append(output)
        raise StopForward

    def before(_module: nn.Module, args: tuple) -> None:
        seen.append(args)
        raise StopForward

    with hooked([(module, after if kind == "forward" else before)], kind):
        try:
            model(batch)
        except StopForward:
            pass
    if not seen:
        raise RuntimeError(f"{'module ' + repr(name) if name else 'the module'} was not called in the forward pass")
    return seen[0]
