"""The KV cache of a running batch: room reserved ahead, and rows merged, dropped and trimmed.

transformers' `DynamicLayer` grows by `torch.cat` at every step, which copies the
layer's whole cache for one new position: at 32 rows of 400-500 tokens that copying
made a CPU decode step up to 1.5x slower here, and on a GPU it is as much memory
traffic as the attention itself. `ReservedLayer` keeps room for `room_tokens` more positions
behind the cached ones, so a step writes its keys and values in place and the
cache is copied once every `room_tokens` steps. The tensors it hands out are
views of that room, so the model, the masks and `get_seq_length` see exactly
what a `DynamicLayer` shows them.

The batch's own operations keep the room too, so none of them costs a second copy
at the next step: a newcomer's rows are merged straight into a new room, and
finished rows leave in one copy of the rows that stay, without the leading
columns only departed rows used (so a long row that left holds no memory).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

ROOM_TOKENS = 128
"""Positions reserved ahead per row: the cache is copied once per this many steps. On a GPU
each costs a row what one token costs (Llama-3-8B in bf16: 128 KiB), so at most 16 MiB a row."""


def _capacity(tokens: int, room_tokens: int) -> int:
    """Room for `tokens` and at least one more, in whole multiples of `room_tokens` (0: no spare)."""
    return tokens if room_tokens <= 0 else (tokens // room_tokens + 1) * room_tokens


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the front of a larger tensor (its room).

    `keys`/`values` stay plain attributes, so code that replaces them (transformers'
    `crop`, offloading) still works: the next `update` sees they are no longer the front
    of the room and reserves a new one around them.
    """

    def __init__(self, room_tokens: int = ROOM_TOKENS) -> None:
        super().__init__()
        self.room_tokens = room_tokens
        self.key_room: torch.Tensor | None = None
        self.value_room: torch.Tensor | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer, room_tokens: int) -> ReservedLayer:
        """The same cached tensors as `layer` (not copied): room is reserved at the next update."""
        reserved = cls(room_tokens)
        reserved.__dict__.update(vars(layer))  # keys, values, device, is_initialized
        return reserved

    def _in_room(self, tokens: int) -> bool:
        """Whether keys/values are the front `tokens`-or-fewer positions of the room and
        `tokens` positions fit in it."""
        pairs = ((self.keys, self.key_room), (self.values, self.value_room))
        return all(room is not None and cached is not None and cached.data_ptr() == room.data_ptr()
                   and cached.stride() == room.stride() and cached.shape[:2] == room.shape[:2]
                   and tokens <= room.shape[2] for cached, room in pairs)

    def _show(self, tokens: int) -> None:
        self.keys, self.values = self.key_room[:, :, :tokens], self.value_room[:, :, :tokens]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions in place (copying the cache into a new room only when full)."""
        if not self.is_initialized:  # the installed transformers' own first update (its lazy init varies)
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.get_seq_length()
        tokens = length + key_states.shape[-2]
        if not self._in_room(tokens):
            self.key_room, self.value_room = (
                _room_like(new, _capacity(tokens, self.room_tokens), old[:, :, :length] if length else None)
                for new, old in ((key_states, self.keys), (value_states, self.values)))
        self.key_room[:, :, length:tokens] = key_states
        self.value_room[:, :, length:tokens] = value_states
        self._show(tokens)
        return self.keys, self.values

    def keep_rows(self, indices: torch.Tensor, first: int = 0) -> None:
        """Keep rows `indices` (in that order) from position `first` on, room included, in one
        copy of just that: the memory of the rows and columns left behind is freed."""
        length = self.get_seq_length()
        if length and self._in_room(length):
            self.key_room = self.key_room[indices, :, first:]
            self.value_room = self.value_room[indices, :, first:]
            self._show(length - first)
        elif length:
            self.keys, self.values = self.keys[indices, :, first:], self.values[indices, :, first:]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keep_rows(indices)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.keep_rows(beam_idx)

    def rooms_for(self, joining: DynamicLayer, pad_mine: int) -> list[torch.Tensor]:
        """New (key, value) rooms for these rows and `joining`'s, allocated, not yet written."""
        tokens = self.get_seq_length() + pad_mine
        return [mine.new_empty((mine.shape[0] + theirs.shape[0], mine.shape[1],
                                _capacity(tokens, self.room_tokens), mine.shape[3]))
                for mine, theirs in ((self.keys, joining.keys), (self.values, joining.values))]

    def append_rows(self, joining: DynamicLayer, pad_mine: int, pad_joining: int) -> None:
        """Add `joining`'s rows after these, each side left-padded with zeros to one length,
        written straight into a new room (one copy, not a concatenation then a reserve)."""
        tokens = self.get_seq_length() + pad_mine
        rooms = self.rooms_for(joining, pad_mine)
        for room, mine, theirs in zip(rooms, (self.keys, self.values), (joining.keys, joining.values)):
            for rows, part, pad in ((room[:mine.shape[0]], mine, pad_mine),
                                    (room[mine.shape[0]:], theirs, pad_joining)):
                rows[:, :, :pad].zero_()  # masked out, but must be finite: 0 x NaN is NaN
                rows[:, :, pad:tokens] = part
        self.key_room, self.value_room = rooms
        self._show(tokens)

    def give_back_rows(self, rows: int, pad_mine: int) -> None:
        """Undo `append_rows`: the first `rows` rows without the `pad_mine` columns it put in
        front of them, as views of the merged room (keeping its room ahead, so the next step
        still writes in place); the room's memory is freed when the rows next change."""
        tokens = self.get_seq_length() - pad_mine
        self.key_room, self.value_room = self.key_room[:rows, :, pad_mine:], self.value_room[:rows, :, pad_mine:]
        self._show(tokens)

    def compact(self) -> None:
        """Move the rows into a room of their own size (as `keep_rows` leaves them), letting go
        of a larger one they are views of (`give_back_rows`)."""
        tokens = self.get_seq_length()
        self.key_room, self.value_room = (_room_like(cached, _capacity(tokens, self.room_tokens), cached)
                                          for cached in (self.keys, self.values))
        self._show(tokens)


def _room_like(like: torch.Tensor, capacity: int, front: torch.Tensor | None) -> torch.Tensor:
    room = like.new_empty((like.shape[0], like.shape[1], capacity, like.shape[3]))
    if front is not None:
        room[:, :, :front.shape[2]] = front
    return room


def reserve_room(cache: Cache, room_tokens: int = ROOM_TOKENS, context_length: int | None = None):
    """Make every plain `DynamicLayer` of a freshly prefilled cache a `ReservedLayer` (in place);
    other layer types (sliding-window, recurrent) are left as they are, except a sliding window
    longer than the model's context (Phi-3.5-mini: 262,144 against 131,072), which never
    slides: that layer is a plain one, and the batch can take newcomers."""
    layers = getattr(cache, "layers", None)
    if layers:
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer or _never_slides(layer, context_length):
                layers[i] = ReservedLayer.adopt(layer, room_tokens)
    return cache


def _never_slides(layer, context_length: int | None) -> bool:
    """A sliding-window layer keeps its last `sliding_window - 1` positions: with a context
    shorter than that it keeps them all, exactly as a plain layer does."""
    return (context_length is not None and type(layer) is DynamicSlidingWindowLayer
            and layer.sliding_window > context_length)


def mergeable(cache: Cache) -> bool:
    """Whether this cache is plain per-layer key/value tensors that can be padded and merged."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer) is ReservedLayer and layer.is_initialized for layer in layers)


def select_rows(cache: Cache, indices: torch.Tensor) -> None:
    """Keep (or repeat) rows `indices` of any cache, in place. `reorder_cache` (beam search's)
    selects every state a layer has: keys and values, and a hybrid model's convolution and
    recurrent states (LFM2, Granite-4 hybrid, Qwen3-Next), which `batch_select_indices`
    does not reach."""
    cache.reorder_cache(indices)


def merge(running, joining, pad_running: int, pad_joining: int) -> None:
    """Append `joining`'s rows to `running`, in place, left-padding the shorter to equal length.

    Layer by layer: each layer's new room replaces its old one (freed at once) before the next
    is made, so the merge needs one layer's room more than the running cache, not a second
    cache beside it (at 32 rows of 8k tokens of an 8B model, 32 GB). All layers or none: out of
    GPU memory part-way, the layers merged so far give the newcomers' rows back (as views of
    their new rooms: no memory is needed to undo) and then move them into rooms of their own
    size, freeing the merged ones; only the newcomers fail, and the running batch goes on as
    it was."""
    merged = []
    try:
        for mine, theirs in zip(running.layers, joining.layers):
            rows = mine.keys.shape[0]
            mine.append_rows(theirs, pad_running, pad_joining)
            merged.append((mine, rows))
    except BaseException:
        for layer, rows in merged:
            layer.give_back_rows(rows, pad_running)
        # Then out of the merged rooms (the newcomers' rows, their width), one layer at a time:
        # each copy is smaller than the room it frees. Still out of memory: the views stay.
        for layer, _ in merged:
            try:
                layer.compact()
            except Exception:  # noqa: BLE001 - the views serve as well, only larger
                break
        raise


def keep_rows(cache: Cache, indices: torch.Tensor, first: int = 0) -> None:
    """Keep rows `indices` of a mergeable cache, from position `first` on (the columns before
    it are padding for every row kept)."""
    for layer in cache.layers:
        layer.keep_rows(indices, first)
