"""TokenStore: in-place appends equal torch.cat, across geometric growth, per-field lengths and batch ops."""
import pytest
import torch

from h1bkv_lite.storage import TokenStore


def test_appends_equal_concatenation_across_growth():
    gen = torch.Generator().manual_seed(0)
    store, chunks = TokenStore(), []
    for n in (300, 1, 1, 57, 1, 400, 3):  # the first chunk sizes the buffers; later ones make them grow
        chunk = {"codes": torch.randint(0, 255, (2, 3, n, 16), generator=gen, dtype=torch.uint8),
                 "scales": torch.randn(2, 3, n, generator=gen).half()}
        store.append(chunk)
        chunks.append(chunk)
        for name in chunk:
            assert torch.equal(store.view()[name], torch.cat([c[name] for c in chunks], dim=2))
    assert len(store) == 763 and store.capacity >= 763 and store.capacity % 256 == 0
    assert store.nbytes() == {"codes": 2 * 3 * 763 * 16, "scales": 2 * 3 * 763 * 2}
    assert store.reserved_nbytes() >= sum(store.nbytes().values())


def test_slots_are_written_in_place_and_views_share_the_buffer():
    store = TokenStore()
    like = {"x": torch.zeros(1, 2, 0, 4)}
    store.slots(5, like)["x"].fill_(1.0)
    store.commit(5)
    slot = store.slots(1, like)["x"]
    slot.fill_(2.0)
    store.commit(1)
    view = store.view()["x"]
    assert view.shape == (1, 2, 6, 4) and view[:, :, :5].eq(1).all() and view[:, :, 5].eq(2).all()
    assert view.data_ptr() == slot.data_ptr() - 5 * 4 * slot.element_size()


def test_fields_advance_by_their_own_amounts_and_batch_ops():
    store = TokenStore()
    store.append({"groups": torch.ones(2, 1, 1, 8), "tokens": torch.arange(8.0).view(1, 1, 8, 1).expand(2, 1, 8, 1)})
    store.append({"groups": torch.zeros(2, 1, 1, 8), "tokens": torch.ones(2, 1, 8, 1)})
    assert store.view()["groups"].shape[2] == 2 and store.view()["tokens"].shape[2] == 16
    store.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1, 0])))
    assert store.view()["tokens"].shape == (3, 1, 16, 1)
    with pytest.raises(ValueError, match="fields"):
        store.append({"other": torch.ones(3, 1, 1, 1)})


def test_growth_must_exceed_one():
    with pytest.raises(ValueError, match="growth"):
        TokenStore(growth=1.0)


def test_slots_of_an_empty_store_need_the_field_shapes():
    with pytest.raises(ValueError, match="like="):
        TokenStore().slots(1)


def test_drop_front_keeps_a_window_without_growing_and_equals_the_tail():
    """A sliding window: append one entry, drop the oldest; the view is always the newest entries, the buffer
    is compacted in place (not grown) and the dropped part is not counted."""
    store, history = TokenStore(), []
    gen = torch.Generator().manual_seed(0)
    for step in range(700):
        chunk = {"codes": torch.randint(0, 255, (1, 2, 3 if step == 0 else 1, 4), generator=gen, dtype=torch.uint8),
                 "half": torch.randn(1, 2, 3 if step == 0 else 1, generator=gen).half()}
        store.append(chunk)
        history.append(chunk)
        if len(store) > 7:
            store.drop_front(len(store) - 7)
        for name in chunk:
            assert torch.equal(store.view()[name], torch.cat([c[name] for c in history], dim=2)[:, :, -7:])
    assert store.capacity == 256 and store.nbytes() == {"codes": 2 * 7 * 4, "half": 2 * 7 * 2}
    store.truncate(3)  # relative to the live entries
    assert torch.equal(store.view()["codes"], torch.cat([c["codes"] for c in history], dim=2)[:, :, -7:-4])
    store.drop_front({"codes": 1, "half": 2})
    assert store.view()["codes"].shape[2] == 2 and store.view()["half"].shape[2] == 1


def test_reserve_allocates_a_static_capacity_that_appends_keep():
    store = TokenStore()
    store.reserve({"codes": torch.zeros(2, 3, 0, 16, dtype=torch.uint8), "scales": torch.zeros(2, 3, 0).half()}, 300)
    assert store.capacity == 512 and len(store) == 0 and store.nbytes() == {"codes": 0, "scales": 0}
    pointers = {name: t.data_ptr() for name, t in store.buffers().items()}
    for n in (200, 1, 1, 100):  # within the capacity: written in place, the buffers never move
        store.append({"codes": torch.ones(2, 3, n, 16, dtype=torch.uint8), "scales": torch.ones(2, 3, n).half()})
    assert len(store) == 302 and {name: t.data_ptr() for name, t in store.buffers().items()} == pointers
    assert store.buffers()["codes"].shape == (2, 3, 512, 16)
    with pytest.raises(ValueError, match="needs an empty store"):
        store.reserve({"codes": torch.zeros(2, 3, 0, 16, dtype=torch.uint8)}, 10)


def test_append_position_writes_whole_buffers_at_the_fill_level_across_growth_and_compaction():
    """``append_position`` makes the same room ``slots`` does and returns the slot in ``buffers()`` where the entries
    go: writing there and committing equals appending, when the buffers grow and when dropped entries are compacted
    away; fields filled to different slots are refused."""
    gen = torch.Generator().manual_seed(1)
    store, reference, history, compactions = TokenStore(), TokenStore(), [], []
    like = {"codes": torch.zeros(1, 2, 0, 4, dtype=torch.uint8), "scales": torch.zeros(1, 2, 0, dtype=torch.float16)}
    for step, n in enumerate((10, *([1] * 500), 5)):
        chunk = {"codes": torch.randint(0, 255, (1, 2, n, 4), generator=gen, dtype=torch.uint8),
                 "scales": torch.randn(1, 2, n, generator=gen).half()}
        start_before, capacity_before = store._start["codes"] if store.capacity else 0, store.capacity
        pos = store.append_position(n, like if step == 0 else None)
        if start_before and store._start["codes"] == 0 and store.capacity == capacity_before:
            compactions.append(step)  # the live entries moved to the front, in place
        for name, buf in store.buffers().items():
            buf[:, :, pos:pos + n] = chunk[name]
        store.commit(n)
        reference.append(chunk)
        if step < 200 and step % 3 == 2:  # a sliding window's drops: compacted, not grown; later it grows
            store.drop_front(2)
            reference.drop_front(2)
        history.append(store.capacity)
        for name in chunk:
            assert torch.equal(store.view()[name], reference.view()[name]), (step, name)
    assert history[-1] > history[0]  # it grew at least once
    assert compactions, "no append compacted the buffer"
    uneven = TokenStore()
    uneven.append({"a": torch.ones(1, 1, 2, 1), "b": torch.ones(1, 1, 3, 1)})
    with pytest.raises(ValueError, match="same slot"):
        uneven.append_position(1)
    with pytest.raises(ValueError, match="like="):
        TokenStore().append_position(1)
