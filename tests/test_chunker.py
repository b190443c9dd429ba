from hypothesis import given
from hypothesis import strategies as st

from castore.format.chunker import chunk_count, chunk_nbytes_for, chunk_slices, chunks_covering


@given(rows=st.integers(0, 10_000), row=st.integers(1, 5000), target=st.integers(4096, 1 << 20))
def test_chunks_are_whole_rows_when_rows_fit(rows, row, target):
    nbytes = rows * row
    stride = chunk_nbytes_for(nbytes, row, 1, target)
    slices = list(chunk_slices(nbytes, stride))
    assert len(slices) == chunk_count(nbytes, stride)
    assert sum(b - a for a, b in slices) == nbytes
    if row <= target:
        assert stride % row == 0 or nbytes <= target
        assert stride <= max(target, nbytes)


@given(itemsize=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 1 << 16))
def test_huge_rows_are_cut_at_item_boundaries(itemsize, n):
    row = 8192 * itemsize
    stride = chunk_nbytes_for(10 * row, row, itemsize, 4096)
    assert stride % itemsize == 0 and stride <= 4096


def test_chunks_covering_rows():
    assert list(chunks_covering(0, 1, 100)) == [0]
    assert list(chunks_covering(150, 250, 100)) == [1, 2]
    assert list(chunks_covering(5, 5, 100)) == []
