"""Keep checkpointed blocks' inputs in host memory between forward and backward.

With activation checkpointing, what a block keeps for backward is its input (batch x seq x hidden;
32 MiB per block for Llama 3 8B at 2 x 2048 tokens in bf16, 1 GiB over 32 blocks). The rest is
recomputed. ``BlockInputOffload`` moves exactly that tensor to pinned host memory on a side stream
as soon as the block has consumed it, and brings it back in backward: when block i's input is
needed, block i-1's copy is already started, so the host-to-device transfer overlaps block i's
recompute and backward instead of stalling them. The GPU then holds one or two blocks' inputs.

It works through ``torch.autograd.graph.saved_tensors_hooks``, active for the whole model forward
(a forward pre-hook and an always-called forward hook on the root module, which is never compiled).
Non-reentrant checkpointing (eager) and torch.compile's checkpointed regions both save a block's
inputs through those hooks, whereas the tensors saved inside a checkpointed region go to the
checkpoint's own hooks. A saved tensor moves when it has the hidden-state shape (batch, seq, hidden):
the block inputs, and the last block's output that the final norm keeps. The rotary tables and the
masks every block shares stay where they are; the same storage saved twice moves once. With
``activation_checkpoint.keep_outputs`` a compiled block also saves the kept projections' outputs
(batch, seq, width): ``extra_widths`` moves those too (eager checkpointing keeps them in its own cache,
on the device).

Prefetch goes by block: the tensors saved during one block's forward (``install(model, blocks)``) are
one group, and when backward unpacks the first of a group, every tensor of the group before it starts
coming back, so that a block with several saved tensors does not wait for the later ones.

On a CPU device the "host copy" is a plain copy: the same code path runs in tests, without streams.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["BlockInputOffload"]


@dataclass
class _Stored:
    host: torch.Tensor
    device: torch.device
    # Set on CUDA: the device-to-host copy's completion, and the device copy being prefetched.
    offloaded: torch.cuda.Event | None = None
    prefetched: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    restored: bool = False
    group: int = 0  # the block (or, without blocks, the tensor) whose forward saved it


class BlockInputOffload:
    """Saved-tensor hooks that offload each block's input; one instance per model.

    ``install(model, blocks)`` makes every forward of ``model`` offload; ``hidden_size`` and
    ``extra_widths`` pick the tensors (by their last dim). Counters ``offloaded`` / ``restored``
    (distinct tensors) tell tests what moved.
    """

    def __init__(self, hidden_size: int, extra_widths=()):
        self.hidden_size = hidden_size
        self.widths = {hidden_size, *extra_widths}
        self._group = 0
        self._by_block = False
        self.stream: torch.cuda.Stream | None = None  # created with the first CUDA tensor
        # Stored tensors not yet brought back, in forward order: backward walks them in reverse
        # and prefetches the group (block) before the one it restores. Weak: a graph that is dropped
        # without a backward takes its host copies with it.
        self._pending: list[weakref.ref] = []
        self._seen: dict[int, tuple[weakref.ref, _Stored]] = {}
        self._hooks = None
        self.offloaded = 0
        self.restored = 0

    def install(self, model: torch.nn.Module, blocks=()) -> None:
        model.register_forward_pre_hook(lambda *_: self._enter())
        model.register_forward_hook(lambda *_: self._exit(), always_call=True)
        for block in blocks:
            block.register_forward_pre_hook(lambda *_: self._next_group())
        self._by_block = bool(blocks)

    def _next_group(self) -> None:
        self._group += 1

    def _enter(self) -> None:
        if self._hooks is not None:  # a forward that raised before its hook could run
            self._exit()
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _exit(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        self._seen = {}

    def _pack(self, t: torch.Tensor):
        if t.dim() != 3 or t.shape[-1] not in self.widths or not t.is_floating_point() or t.device.type == "meta":
            return t
        # The same tensor saved twice (e.g. by two checkpointed regions) moves once. Keyed by the
        # tensor itself: a freed tensor's address is soon reused by another of the same shape.
        # A live tensor's id is unique; the weak reference tells a freed tensor's reused id apart.
        ref, stored = self._seen.get(id(t), (None, None))
        if ref is None or ref() is not t:
            stored = self._offload(t)
            self._seen[id(t)] = (weakref.ref(t), stored)
        return stored

    def _offload(self, t: torch.Tensor) -> _Stored:
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        if not self._by_block:
            self._group += 1
        stored = _Stored(host=host, device=t.device, group=self._group)
        if t.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                stored.offloaded = torch.cuda.Event()
                stored.offloaded.record(self.stream)
            # The block's input may be freed as soon as this returns; the allocator must not hand
            # its memory out before the side stream has read it.
            t.record_stream(self.stream)
        else:
            host.copy_(t)
        self._pending.append(weakref.ref(stored))
        self.offloaded += 1
        return stored

    def _unpack(self, stored):
        if not isinstance(stored, _Stored):
            return stored
        out = self._restore(stored)
        for s in self._next_needed(stored):
            if s.device.type == "cuda":
                self._prefetch(s)
        if not stored.restored:
            stored.restored = True
            self.restored += 1
        return out

    def _next_needed(self, stored: _Stored) -> list[_Stored]:
        """Drop ``stored`` from the pending list and return what backward needs next: the rest of its
        block's tensors and all of the block's before it."""
        self._pending = [r for r in self._pending if r() is not None]
        i = next((k for k, r in enumerate(self._pending) if r() is stored), None)
        if i is None:
            return []
        del self._pending[i]
        live = [s for s in (r() for r in self._pending) if s is not None]
        earlier = [s.group for s in live if s.group < stored.group]
        wanted = {stored.group, max(earlier)} if earlier else {stored.group}
        return [s for s in live if s.group in wanted]

    def _prefetch(self, stored: _Stored) -> None:
        if stored.prefetched is not None:
            return
        self.stream.wait_event(stored.offloaded)
        with torch.cuda.stream(self.stream):
            stored.prefetched = stored.host.to(stored.device, non_blocking=True)
            stored.ready = torch.cuda.Event()
            stored.ready.record(self.stream)

    def _restore(self, stored: _Stored) -> torch.Tensor:
        if stored.device.type != "cuda":
            return stored.host.to(stored.device, copy=True)
        self._prefetch(stored)
        current = torch.cuda.current_stream(stored.device)
        current.wait_event(stored.ready)
        out = stored.prefetched
        # Allocated on the side stream, used on the compute stream from here on.
        out.record_stream(current)
        stored.prefetched = None
        return out
