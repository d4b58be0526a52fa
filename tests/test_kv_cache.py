"""The KV cache's reserved room (no Ray): a step writes in place, the batch's own operations
keep the room, and the text a batch makes is the same as with a cache copied every step."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from serve_app import kv_cache
from serve_app.chat_engine import DecodeBatch, Slot
from serve_app.decoding import ChoiceDecoder
from serve_app.jobs import ChatJob
from serve_app.kv_cache import ReservedLayer
from serve_app.sampling import make_rows


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
        if reserved.key_room.data_ptr() != room:
            copied_at.append(reserved.get_seq_length())
            room = reserved.key_room.data_ptr()
    assert copied_at == [5, 9, 17]  # rooms of 8, 16 and 24 positions
    assert reserved.value_room.shape[2] == 24 and reserved.keys.shape[2] == 24


def test_rows_selected_trimmed_and_merged_keep_their_values_and_their_room():
    reserved, plain = ReservedLayer(room_tokens=8), DynamicLayer()
    for step, tokens in enumerate([3, 1, 1]):
        new = states(4, tokens, step)
        reserved.update(*new), plain.update(*new)

    rows = torch.tensor([3, 1])
    reserved.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    assert_same(reserved, plain.keys, plain.values)

    storage = reserved.keys.untyped_storage().data_ptr()
    reserved.drop_front(2)
    assert reserved.keys.untyped_storage().data_ptr() == storage  # a view: nothing copied
    assert_same(reserved, plain.keys[:, :, 2:], plain.values[:, :, 2:])

    joining = ReservedLayer(room_tokens=8)
    joining.update(*states(1, 6, 10))
    running_keys, running_values = reserved.keys.clone(), reserved.values.clone()
    reserved.append_rows(joining, 3, 0)  # 3 positions padded to the newcomer's 6
    assert reserved.keys.shape == (3, 2, 6, 4)
    assert torch.equal(reserved.keys[:2, :, :3], torch.zeros(2, 2, 3, 4))  # padding: zeros, not leftovers
    assert torch.equal(reserved.values[:2, :, :3], torch.zeros(2, 2, 3, 4))
    assert torch.equal(reserved.keys[:2, :, 3:], running_keys) and torch.equal(reserved.values[:2, :, 3:], running_values)
    assert torch.equal(reserved.keys[2:], joining.keys) and torch.equal(reserved.values[2:], joining.values)

    room = reserved.key_room.data_ptr()
    reserved.update(*states(3, 1, 11))  # the merge left room: the next step writes in place
    assert reserved.key_room.data_ptr() == room and reserved.keys.shape[2] == 7


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


def run_batch(model, tokenizer, prompts: list[str], lengths: list[int], room_tokens: int,
              join_every: int) -> list[str]:
    """Greedy rows that join one per `join_every` steps and leave at their own lengths."""
    batch = DecodeBatch(model, tokenizer.pad_token_id, torch.device("cpu"), kv_room_tokens=room_tokens)
    slots = []
    for prompt, length in zip(prompts, lengths):
        job = ChatJob(messages=[{"role": "user", "content": prompt}], max_tokens=length,
                      max_tokens_explicit=True, temperature=0)
        text = tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        decoder = ChoiceDecoder(tokenizer, set(), [], length)  # no EOS: each row runs its length
        slots.append(Slot(prompt_ids=ids, rows=make_rows(job, model.generation_config, [decoder])))
    waiting, step = list(slots), 0
    while waiting or not batch.done:
        batch.tick([waiting.pop(0)] if waiting and step % join_every == 0 else [])
        step += 1
    return [slot.rows[0].decoder.text for slot in slots]


def test_a_batch_with_room_writes_the_text_of_a_cache_copied_every_step_and_of_each_row_alone(models_dir):
    """Rows join and leave while the cache crosses several rooms of 16 positions: the text is
    what a cache without room (copied every step, as `torch.cat` does) gives, and what each
    row gets alone."""
    path = models_dir / "tiny-llama"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = ["hello there", "tell me a story about a long river " * 3, "why", "one two three four"]
    lengths = [60, 45, 52, 38]
    with_room = run_batch(model, tokenizer, prompts, lengths, room_tokens=16, join_every=5)
    assert with_room == run_batch(model, tokenizer, prompts, lengths, room_tokens=0, join_every=5)
    assert with_room == [run_batch(model, tokenizer, [p], [n], room_tokens=16, join_every=1)[0]
                         for p, n in zip(prompts, lengths)]
    assert all(text for text in with_room)
