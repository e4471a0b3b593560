"""processing.buffers: large processor outputs over recycled maps, handed out again only once nothing uses them."""

import torch

from polymodal.processing.buffers import BufferPool

MIB = 1 << 20


def test_a_map_is_handed_out_again_only_after_every_view_of_its_tensor_is_gone():
    pool = BufferPool(threshold=MIB)
    x = pool.empty(512, 1024)  # 2 MiB
    first = x.data_ptr()
    view = x[10:]
    del x
    y = pool.empty(512, 1024)
    assert y.data_ptr() != first  # a view still holds the first map
    del view
    x_again = pool.empty(512, 1024)
    assert x_again.data_ptr() == first
    assert pool.idle_bytes() == 0  # both maps in use
    del x_again, y
    assert pool.idle_bytes() == 2 * 2 * MIB


def test_a_held_output_keeps_its_values_while_others_are_made():
    pool = BufferPool(threshold=MIB)
    kept = pool.empty(1024, 512)
    kept.fill_(3.0)
    for _ in range(3):
        pool.empty(1024, 512).fill_(-1.0)
    assert torch.all(kept == 3.0)


def test_small_requests_are_plain_tensors_and_shapes_and_dtypes_are_kept():
    pool = BufferPool(threshold=MIB)
    small = pool.empty(16, 16)
    assert small.shape == (16, 16) and small.dtype == torch.float32 and not pool._maps
    big = pool.empty(2, 1024, 1024, dtype=torch.uint8)
    assert big.shape == (2, 1024, 1024) and big.dtype == torch.uint8 and big.is_contiguous()
    big.fill_(7)
    assert int(big.sum()) == 7 * 2 * MIB


def test_idle_maps_are_kept_within_the_limit():
    pool = BufferPool(threshold=MIB, limit=5 * MIB)
    held = [pool.empty(MIB // 4 * (k + 1)) for k in range(4)]  # 1, 2, 3 and 4 MiB, rounded up to 2 MiB pages
    del held
    pool.empty(MIB)  # 4 MiB: an idle map reused, the others kept only as far as the limit allows
    assert pool.idle_bytes() <= 5 * MIB
    n = len(pool._maps)
    pool.empty(2 * MIB)  # 8 MiB: over the limit alone, so not pooled
    assert len(pool._maps) == n


def test_qwen2_vl_outputs_of_successive_calls_do_not_share_memory_while_held(monkeypatch):
    import numpy as np

    from polymodal.processing import buffers
    from polymodal.processing.qwen2_vl import Qwen2VLImageProcessor

    monkeypatch.setattr(buffers, "_POOL", BufferPool(threshold=MIB))
    ip = Qwen2VLImageProcessor()
    rng = np.random.default_rng(0)
    a_img, b_img = (rng.integers(0, 256, (448, 448, 3), dtype=np.uint8) for _ in range(2))
    a, _ = ip([a_img])
    a_copy = a.clone()
    b, _ = ip([b_img])
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, a_copy) and not torch.equal(a, b)
    ptr = a.data_ptr()
    del a
    again, _ = ip([a_img])
    assert again.data_ptr() == ptr and torch.equal(again, a_copy)  # recycled, and every element rewritten
