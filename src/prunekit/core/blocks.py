"""What calibration needs of a model, and how it feeds the model's blocks one at a time.

Calibration knows a model only through ``BlockStructure`` (its blocks and, for the layers after
them, its head); ``prunekit.models`` provides it. To feed block ``i`` on its own, calibration
needs everything block ``i`` receives: its hidden states and every other argument the model
passes it. Those are found with the model's own forward, the blocks replaced by stubs that pass
their input through: the stubs record what each block is given (attention masks and rotary
tables differ by layer in models with sliding-window layers), and the pass checks the
assumption sequential calibration rests on, that the blocks run once each, in order, each fed
the previous one's output. The same stubs replay the model's own code after the blocks (final
norm, head, logit scaling or soft-capping) on hidden states computed block by block.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from prunekit.errors import PrunekitError


class BlockStructure(Protocol):
    """The part of a model adapter calibration uses."""

    def blocks(self) -> nn.ModuleList: ...

    def block_name(self, index: int) -> str: ...

    def head(self) -> nn.Module | None: ...


class _StopForward(Exception):
    pass


PROBE_TOKENS = 8


@dataclass
class BlockCall:
    """Everything but the hidden states that one block receives for one batch."""

    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    """The calibration batches as they stand before the next block, and what each block is given.

    ``hidden[b]`` is batch ``b``'s hidden states; ``calls[b][i]`` the other arguments block ``i``
    receives for it. ``hidden_name`` is the keyword the hidden states arrive under (None:
    positionally); ``template`` the rest of a block's output when blocks return a tuple.
    """

    hidden: list[torch.Tensor | None]
    calls: list[list[BlockCall]]
    hidden_name: str | None = None
    template: tuple | None = None
    notes: list[str] = field(default_factory=list)
    # A few tokens of one window, carried through the blocks alongside: each block first runs on them to
    # see how its layers are reached (called as modules, or their weights used directly).
    probe_hidden: torch.Tensor | None = None
    probe_calls: list[BlockCall] | None = None
    # The same batches as the dense model carries them (asymmetric calibration's twin stream); None: no twin.
    reference_hidden: list[torch.Tensor | None] | None = None

    def call(self, block: nn.Module, index: int, batch: int) -> torch.Tensor:
        return self._call(block, self.calls[batch][index], self.hidden[batch])

    def call_reference(self, block: nn.Module, index: int, batch: int) -> torch.Tensor:
        assert self.reference_hidden is not None
        return self._call(block, self.calls[batch][index], self.reference_hidden[batch])

    def call_probe(self, block: nn.Module, index: int) -> torch.Tensor:
        assert self.probe_hidden is not None and self.probe_calls is not None
        return self._call(block, self.probe_calls[index], self.probe_hidden)

    def _call(self, block: nn.Module, call: BlockCall, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.hidden_name is not None:
            out = block(*call.args, **{self.hidden_name: hidden}, **call.kwargs)
        else:
            out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def to_state(self) -> dict:
        """Plain containers only, so ``torch.load(weights_only=True)`` reads it back (resumable streaming)."""
        return {"hidden": self.hidden, "calls": [[(c.args, c.kwargs) for c in batch] for batch in self.calls],
                "hidden_name": self.hidden_name, "template": self.template, "notes": self.notes,
                "probe_hidden": self.probe_hidden,
                "probe_calls": [(c.args, c.kwargs) for c in self.probe_calls] if self.probe_calls else None,
                "reference_hidden": self.reference_hidden}

    @classmethod
    def from_state(cls, state: dict) -> "BlockInputs":
        calls = [[BlockCall(tuple(args), dict(kwargs)) for args, kwargs in batch] for batch in state["calls"]]
        template = state["template"]
        probe_calls = state.get("probe_calls")
        return cls(list(state["hidden"]), calls, state["hidden_name"], tuple(template) if template is not None else None,
                   list(state.get("notes", [])), state.get("probe_hidden"),
                   [BlockCall(tuple(a), dict(k)) for a, k in probe_calls] if probe_calls else None,
                   state.get("reference_hidden"))


def _hidden_parameter(block: nn.Module) -> str:
    try:
        parameters = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return "hidden_states"
    return parameters[0] if parameters and parameters[0] not in ("args", "kwargs") else "hidden_states"


@contextlib.contextmanager
def stubbed_blocks(blocks: nn.ModuleList, step: Callable[[int, torch.Tensor, tuple, dict], torch.Tensor],
                   template: tuple | None = None) -> Iterator[None]:
    """Replace every block's forward (on the instances) by ``step(index, hidden, args, kwargs)``.

    The stub's result stands for the block's output: a bare tensor, or (with ``template``, the rest of
    what a real block returned) a tuple starting with it.
    """
    restore = []
    for index, block in enumerate(blocks):
        name = _hidden_parameter(block)
        had_own = "forward" in block.__dict__
        own = block.__dict__.get("forward")

        def forward(*args, _index=index, _name=name, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop(_name), ()
            out = step(_index, hidden, rest, kwargs)
            return out if template is None else (out, *template)

        block.forward = forward
        restore.append((block, had_own, own))
    try:
        yield
    finally:
        for block, had_own, own in restore:
            if had_own:
                block.forward = own
            else:
                del block.forward


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _run_until_head(model: nn.Module, structure: BlockStructure, input_ids: torch.Tensor,
                    on_head: Callable[[torch.Tensor], None] | None = None) -> Any:
    """The model's forward; it stops at the head (whose input ``on_head`` sees) when the model has one."""
    head = structure.head()
    handle = None
    if head is not None:
        def catch(_module, args):
            if on_head is not None:
                on_head(args[0])
            raise _StopForward

        handle = head.register_forward_pre_hook(catch)
    try:
        return model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        return None
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, structure: BlockStructure, windows: torch.Tensor,
                         batch_size: int) -> BlockInputs:
    """Run the model's forward with pass-through blocks; record what each block receives (see the module docstring).

    The first block runs once for real (on the first batch) to show what a block returns, so the stubs
    return the same shape of result. Refuses, in one line, a model whose blocks do not run once each
    and in order, or that changes the hidden states between blocks: feeding its blocks one at a time
    would be silently wrong.
    """
    blocks = structure.blocks()
    device = _model_device(model)
    template = _block_output(model, structure, windows[:batch_size].to(device))
    all_hidden: list[torch.Tensor] = []
    all_calls: list[list[BlockCall]] = []
    batches = [windows[start:start + batch_size] for start in range(0, windows.shape[0], batch_size)]
    probe = windows[:1, :min(PROBE_TOKENS, windows.shape[1])]
    for batch in [*batches, probe]:
        seen: list[tuple[int, torch.Tensor, tuple, dict]] = []

        def step(index, hidden, args, kwargs):
            seen.append((index, hidden, args, kwargs))
            return hidden

        with stubbed_blocks(blocks, step, template):
            _run_until_head(model, structure, batch.to(device))
        problem = _check_block_order(seen, len(blocks), type(model).__name__)
        if problem is not None:
            raise PrunekitError(problem)
        all_hidden.append(seen[0][1])
        all_calls.append([BlockCall(args, kwargs) for _, _, args, kwargs in seen])
    positional = _first_call_positional(blocks[0], model, structure, windows[:1].to(device))
    probe_hidden, probe_calls = all_hidden.pop(), all_calls.pop()
    return BlockInputs(all_hidden, all_calls, None if positional else _hidden_parameter(blocks[0]), template,
                       probe_hidden=probe_hidden, probe_calls=probe_calls)


def _block_output(model: nn.Module, structure: BlockStructure, ids: torch.Tensor) -> tuple | None:
    """What the first block really returns besides its hidden states: None for a bare tensor, else the
    tuple's other elements (the stubs return the same)."""
    found: list[Any] = []

    def catch(_module, _args, output):
        found.append(output)
        raise _StopForward

    handle = structure.blocks()[0].register_forward_hook(catch)
    try:
        _run_until_head(model, structure, ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not found:
        raise PrunekitError(f"{type(model).__name__}'s forward never runs its first block")
    output = found[0]
    return tuple(output[1:]) if isinstance(output, (tuple, list)) else None


def _first_call_positional(block: nn.Module, model: nn.Module, structure: BlockStructure, ids: torch.Tensor) -> bool:
    """Whether the model hands the first block its hidden states positionally (the stubs cannot tell)."""
    found: list[bool] = []

    def catch(_module, args, _kwargs):
        found.append(bool(args))
        raise _StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        _run_until_head(model, structure, ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return found[0] if found else True


def _check_block_order(seen: list, count: int, model_name: str) -> str | None:
    order = [index for index, *_ in seen]
    if order != list(range(count)):
        return (f"{model_name} does not run its {count} blocks once each in order (ran {order[:8]}"
                f"{'...' if len(order) > 8 else ''}); block-by-block calibration cannot feed them")
    first = seen[0][1]
    for index, hidden, _, _ in seen[1:]:
        if hidden is not first and not (isinstance(hidden, torch.Tensor) and hidden.shape == first.shape
                                        and torch.equal(hidden, first)):
            return (f"{model_name} changes the hidden states between blocks {index - 1} and {index}; "
                    "block-by-block calibration would feed its blocks the wrong inputs")
    return None


@torch.no_grad()
def replay_after_blocks(model: nn.Module, structure: BlockStructure, input_ids: torch.Tensor,
                        final_hidden: torch.Tensor, template: tuple | None = None,
                        on_head: Callable[[torch.Tensor], None] | None = None, stop_at_head: bool = False):
    """The model's output (logits) for ``input_ids`` given the last block's output ``final_hidden``.

    The model's own code runs after the blocks (final norm, head, any logit scaling), so nothing about
    it has to be known. ``on_head`` sees the head's input; ``stop_at_head`` skips the head itself.
    """
    last = len(structure.blocks()) - 1

    def step(index, hidden, _args, _kwargs):
        return final_hidden if index == last else hidden

    with stubbed_blocks(structure.blocks(), step, template):
        if stop_at_head:
            _run_until_head(model, structure, input_ids, on_head)
            return None
        head = structure.head()
        handle = None
        if head is not None and on_head is not None:
            handle = head.register_forward_pre_hook(lambda _m, args: on_head(args[0]))
        try:
            return model(input_ids=input_ids, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
