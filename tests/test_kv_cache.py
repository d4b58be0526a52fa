"""The KV cache's reserved room (no Ray): a step writes in place, the batch's own operations
keep the room, and the text a batch makes is the same as with a cache copied every step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from serve_app import kv_cache
from serve_app.chat_engine import DecodeBatch, Slot
from serve_app.decoding import ChoiceDecoder
from serve_app.jobs import ChatJob
from serve_app.kv_cache import ReservedLayer
from serve_app.sampling import SamplingDefaults, make_rows


def states(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, 2, tokens, 4, generator=generator) for _ in range(2))


def assert_same(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_step_writes_in_place_and_the_cache_is_copied_once_per_room():
    reserved, plain = ReservedLayer(room_tokens=8), DynamicLayer()
    copied_at, room = [], None
    for step in range(20):
        new = states(3, 5 if step == 0 else 1, step)  # a prefill of 5 positions, then one per step
        assert [torch.equal(a, b) for a, b in zip(reserved.update(*new), plain.update(*new))] == [True, True]
        if reserved.key_room is not None and reserved.key_room.data_ptr() != room:
            copied_at.append(reserved.get_seq_length())
            room = reserved.key_room.data_ptr()
    # The first update is transformers' own (its lazy initialisation differs between versions);
    # then rooms of 8, 16 and 24 positions.
    assert copied_at == [6, 9, 17]
    assert reserved.value_room.shape[2] == 24 and reserved.keys.shape[2] == 24


@pytest.fixture
def nan_allocations(monkeypatch):
    """Fresh float tensors from `new_empty` come filled with NaN, as leftovers on a GPU may be: a
    padding column the cache forgot to zero then poisons attention (0 x NaN is NaN)."""
    plain = torch.Tensor.new_empty

    def nan_filled(self, *args, **kwargs):
        tensor = plain(self, *args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled)


def filled(rows: int, tokens: int) -> tuple[ReservedLayer, DynamicLayer]:
    """The same `tokens` positions (a prefill, then single steps) in a ReservedLayer and a DynamicLayer."""
    reserved, plain = ReservedLayer(room_tokens=8), DynamicLayer()
    for step, count in enumerate([tokens - 2, 1, 1]):
        new = states(rows, count, step)
        reserved.update(*new), plain.update(*new)
    return reserved, plain


def test_rows_kept_from_a_column_on_free_the_rest_and_keep_their_room(nan_allocations):
    reserved, plain = filled(rows=4, tokens=5)
    rows = torch.tensor([3, 1, 1])  # a row may be kept twice (a request's choices start as copies)
    reserved.keep_rows(rows, first=2)
    assert_same(reserved, plain.keys[rows, :, 2:], plain.values[rows, :, 2:])
    for room in (reserved.key_room, reserved.value_room):  # its own allocation: the rest is freed
        assert room.shape == (3, 2, 8 - 2, 4) and room.untyped_storage().nbytes() == room.numel() * 4
    kept = reserved.key_room.data_ptr()
    reserved.update(*states(3, 1, 9))
    assert reserved.key_room.data_ptr() == kept and reserved.keys.shape[2] == 4  # written in place


@pytest.mark.parametrize("running_tokens, joining_tokens", [(3, 6), (6, 3), (4, 4)])
def test_merged_rows_are_left_padded_with_zeros_into_a_room(nan_allocations, running_tokens, joining_tokens):
    reserved, _ = filled(rows=2, tokens=running_tokens)
    joining, _ = filled(rows=1, tokens=joining_tokens)
    joining = kv_cache.reserve_room(SimpleNamespace(layers=[joining])).layers[0]
    width = max(running_tokens, joining_tokens)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in (reserved, joining)]
    kv_cache.merge(SimpleNamespace(layers=[reserved]), SimpleNamespace(layers=[joining]),
                   width - running_tokens, width - joining_tokens)
    assert reserved.keys.shape == (3, 2, width, 4)
    for rows, (keys, values) in zip((slice(0, 2), slice(2, 3)), before):
        pad = width - keys.shape[2]
        for merged, part in ((reserved.keys[rows], keys), (reserved.values[rows], values)):
            assert torch.equal(merged[:, :, :pad], torch.zeros_like(merged[:, :, :pad]))  # zeros, never leftovers
            assert torch.equal(merged[:, :, pad:], part)
    room = reserved.key_room.data_ptr()
    reserved.update(*states(3, 1, 11))  # the merge left room: the next step writes in place
    assert reserved.key_room.data_ptr() == room and reserved.keys.shape[2] == width + 1


def test_a_merge_frees_each_layers_old_room_before_making_the_next_and_undoes_itself_in_place(monkeypatch):
    """Layer by layer: when a layer's new room is made, the layers merged before it hold only
    their new rooms (the peak is the cache plus one layer, not two caches). Out of memory at
    the third layer, the first two give the newcomers' rows back and move into rooms of their
    own size (the merged rooms are let go), every layer shows what it showed before, and the
    next step still writes in place."""
    import gc
    import weakref

    running = [filled(rows=2, tokens=5)[0] for _ in range(4)]
    joining = [kv_cache.reserve_room(SimpleNamespace(layers=[filled(rows=1, tokens=7)[0]])).layers[0]
               for _ in range(4)]
    before = [(layer.keys.clone(), layer.values.clone()) for layer in running]
    old_rooms = [weakref.ref(layer.key_room) for layer in running]
    real_rooms, alive_at_call = ReservedLayer.rooms_for, []

    def rooms_for(self, theirs, pad_mine):
        gc.collect()
        alive_at_call.append([room() is not None for room in old_rooms])
        if len(alive_at_call) == 3:
            raise torch.OutOfMemoryError("injected")
        return real_rooms(self, theirs, pad_mine)

    monkeypatch.setattr(ReservedLayer, "rooms_for", rooms_for)
    with pytest.raises(torch.OutOfMemoryError):
        kv_cache.merge(SimpleNamespace(layers=running), SimpleNamespace(layers=joining), 2, 0)
    assert alive_at_call == [[True] * 4, [False, True, True, True], [False, False, True, True]]
    monkeypatch.undo()
    for layer, (keys, values) in zip(running, before):
        assert_same(layer, keys, values)
        assert layer.key_room.shape[:3] == layer.value_room.shape[:3] == (2, 2, 8)  # its rows, its width's room
        assert layer.key_room._base is None and layer.value_room._base is None  # no view of a merged room
        room = layer.key_room.data_ptr()
        step = states(2, 1, 12)
        layer.update(*step)
        assert layer.key_room.data_ptr() == room  # in place, in the room given back
        assert_same(layer, torch.cat([keys, step[0]], dim=2), torch.cat([values, step[1]], dim=2))


def test_only_plain_layers_get_room_and_only_such_caches_merge():
    plain = DynamicCache()
    plain.layers = [DynamicLayer(), DynamicLayer()]
    sliding = DynamicCache()
    sliding.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]
    for cache in (plain, sliding):
        for layer in cache.layers:
            layer.update(*states(1, 2, 0))
        kv_cache.reserve_room(cache)
    assert [type(layer) for layer in plain.layers] == [ReservedLayer, ReservedLayer]
    assert [type(layer) for layer in sliding.layers] == [ReservedLayer, DynamicSlidingWindowLayer]
    assert kv_cache.mergeable(plain) and not kv_cache.mergeable(sliding)
    assert torch.equal(plain.layers[0].keys, states(1, 2, 0)[0])  # adopted as they were


Request = tuple[str, int, int, float]  # prompt, tokens, choices (n), temperature


def run_batch(model, tokenizer, requests: list[Request], room_tokens: int, join_every: int) -> list[list[str]]:
    """Each request's choices' texts; requests join one per `join_every` steps and leave at
    their own lengths (seeded, so sampled choices repeat)."""
    batch = DecodeBatch(model, tokenizer.pad_token_id, torch.device("cpu"), kv_room_tokens=room_tokens)
    slots = []
    for prompt, length, n, temperature in requests:
        job = ChatJob(messages=[{"role": "user", "content": prompt}], max_tokens=length,
                      max_tokens_explicit=True, temperature=temperature, n=n, seed=7)
        text = tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        decoders = [ChoiceDecoder(tokenizer, set(), [], length) for _ in range(n)]  # no EOS: rows run their length
        slots.append(Slot(prompt_ids=ids, rows=make_rows(job, SamplingDefaults.of(model.generation_config), decoders)))
    waiting, step = list(slots), 0
    while waiting or not batch.done:
        batch.tick([waiting.pop(0)] if waiting and step % join_every == 0 else [])
        step += 1
    return [[row.decoder.text for row in slot.rows] for slot in slots]


def test_a_batch_with_room_writes_the_text_of_a_cache_copied_every_step_and_of_each_request_alone(
        models_dir, nan_allocations):
    """Requests join and leave (a long one first) while the cache crosses several rooms of 16
    positions, with fresh memory full of NaN: the text is what a cache without room (copied
    every step, as `torch.cat` does) gives, and what each request gets alone."""
    path = models_dir / "tiny-llama"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    requests = [("tell me a story about a long river " * 3, 20, 1, 0.0), ("hello there", 60, 1, 0.0),
                ("why", 52, 2, 0.9), ("one two three four", 38, 1, 0.0)]
    with_room = run_batch(model, tokenizer, requests, room_tokens=16, join_every=5)
    assert with_room == run_batch(model, tokenizer, requests, room_tokens=0, join_every=5)
    assert with_room == [run_batch(model, tokenizer, [request], room_tokens=16, join_every=1)[0]
                         for request in requests]
    assert all(all(texts) for texts in with_room) and with_room[2][0] != with_room[2][1]
