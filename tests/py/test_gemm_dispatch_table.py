"""The GEMM dispatch table's logic (no GPU needed): M buckets, loading and validating the JSON the
tuner writes, lookups, and the fallbacks for shapes it does not hold."""

import json

import pytest
import torch

from rtpllm.layers import gemm_dispatch
from rtpllm.layers.gemm_dispatch import CUBLAS, GEMV, M_BUCKETS, GemmChoice, GemmTable, m_bucket


def write(tmp_path, entries):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"arch": "sm90", "entries": entries}))
    return path


def entry(**kw):
    return {"dtype": "bfloat16", "n": 4096, "k": 4096, "m": 8, "backend": "sm90", "kernel": "k1", "splits": 0, **kw}


def test_m_bucket_is_the_smallest_that_holds_m():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 9, 256, 257, 8192, 100000)] == [1, 2, 4, 8, 16, 256, 512, 8192, 8192]
    assert list(M_BUCKETS) == sorted(M_BUCKETS)


def test_load_and_lookup(tmp_path):
    table = GemmTable.load(write(tmp_path, [entry(), entry(m=1, backend="gemv", kernel="", splits=1)]), {"k1"})
    assert table.lookup(7, 4096, 4096, torch.bfloat16) == GemmChoice("sm90", "k1", 0)
    assert table.lookup(1, 4096, 4096, torch.bfloat16) == GemmChoice("gemv", "", 1)
    assert table.lookup(7, 4096, 4096, torch.float16) is None
    assert table.lookup(7, 4096, 1024, torch.bfloat16) is None
    assert table.lookup(9, 4096, 4096, torch.bfloat16) is None


def test_entries_of_the_running_card_or_else_the_first_card(tmp_path):
    path = write(tmp_path, [entry(device="A"), entry(device="B", kernel="k2", splits=3, swizzle=8)])
    assert GemmTable.load(path, None, "B").lookup(8, 4096, 4096, torch.bfloat16) == GemmChoice("sm90", "k2", 3, 8)
    assert GemmTable.load(path, None, "C").lookup(8, 4096, 4096, torch.bfloat16) == GemmChoice("sm90", "k1", 0, 1)
    assert GemmTable.load(path, None, None).lookup(8, 4096, 4096, torch.bfloat16) == GemmChoice("sm90", "k1", 0, 1)


@pytest.mark.parametrize("bad, field", [(entry(backend="magic"), "backend"), (entry(kernel="k2"), "kernel"),
                                        (entry(m=7), "m")])
def test_bad_entries_name_the_field(tmp_path, bad, field):
    with pytest.raises(ValueError, match=rf"entries\[1\]\.{field}"):
        GemmTable.load(write(tmp_path, [entry(), bad]), {"k1"})


def test_shipped_table_is_well_formed():
    if not gemm_dispatch.DEFAULT_TABLE.exists():
        pytest.skip("no table measured yet")
    table = GemmTable.load(gemm_dispatch.DEFAULT_TABLE)  # kernel names are checked on the GPU
    assert table.entries
    assert all(c.backend in gemm_dispatch.BACKENDS for c in table.entries.values())


def test_unknown_shapes_fall_back_by_size():
    gemm_dispatch.choose.cache_clear()
    assert gemm_dispatch.choose(4, 24, 40, torch.bfloat16) == GEMV
    assert gemm_dispatch.choose(5, 24, 40, torch.bfloat16) == CUBLAS


def test_cpu_linear_is_torch():
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    torch.testing.assert_close(gemm_dispatch.linear(x, w, b), torch.nn.functional.linear(x, w, b))
