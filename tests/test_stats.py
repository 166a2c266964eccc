"""Weight statistics against numpy on the same tensors."""

from __future__ import annotations

import numpy as np
import pytest

from studio.checkpoints import open_checkpoint
from studio.checkpoints.base import TensorRef
from studio.inspection.stats import ModelSummary, iter_weight_stats, tensor_stats


def _ref(array, name="t"):
    import torch

    t = torch.from_numpy(array)
    return TensorRef(
        name,
        tuple(t.shape),
        str(t.dtype).removeprefix("torch."),
        load=lambda: t,
        load_rows=lambda a, b: t[a:b],
    )


def _check(stats, x, bins):
    x64 = x.astype(np.float64)
    assert stats.params == x.size
    assert stats.min == pytest.approx(x.min()) and stats.max == pytest.approx(x.max())
    # float32 reductions within a chunk, float64 across chunks: numpy's float64 result to ~1e-7
    assert stats.mean == pytest.approx(x64.mean(), rel=1e-6, abs=1e-7 * x64.std())
    assert stats.std == pytest.approx(x64.std(), rel=1e-6)
    assert stats.sparsity == pytest.approx(np.mean(x == 0))
    assert stats.outliers == pytest.approx(np.mean(np.abs(x64 - x64.mean()) > 6 * x64.std()))
    counts, edges = np.histogram(x, bins=bins, range=(stats.min, stats.max))
    assert np.allclose(stats.edges, edges)
    if stats.sample_size is None:
        assert stats.counts == counts.tolist()
        assert sum(stats.counts) == x.size
    else:  # a big tensor in a whole-checkpoint pass: its histogram is estimated from a sample
        assert abs(sum(stats.counts) - x.size) <= bins
        assert np.abs(np.array(stats.counts) - counts).max() < 0.01 * x.size


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 23])
def test_stats_match_numpy_whatever_the_chunking(chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 2.0, size=(300, 41)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    x[5, 7] = 40.0  # an outlier
    _check(tensor_stats(_ref(x), bins=64, chunk_elements=chunk), x, 64)


def test_constant_and_nonfinite_tensors():
    s = tensor_stats(_ref(np.full((4, 4), 2.5, np.float32)))
    assert s.std == 0 and s.edges[0] == 2.0 and s.edges[-1] == 3.0 and sum(s.counts) == 16
    x = np.array([1.0, np.nan, np.inf, 3.0], np.float32)
    s = tensor_stats(_ref(x))
    assert s.nonfinite == 2 and s.mean == 2.0 and sum(s.counts) == 2


def test_minilm_every_tensor_matches_numpy():
    model = open_checkpoint("builtin:minilm")
    refs = {r.name: r for r in model.tensors()}
    summary = ModelSummary()
    stats = list(iter_weight_stats(model, bins=32, summary=summary))
    assert len(stats) == len(refs) == summary.tensors == 104
    assert summary.parameters == 22_713_728
    assert summary.bytes_by_dtype["float32"] == 4 * 22_713_216
    for s in stats:
        if s.dtype == "float32":
            _check(s, refs[s.name].load().numpy(), 32)
    assert [s.name for s in stats if s.sample_size] == ["embeddings.word_embeddings.weight"]


def test_bfloat16_safetensors_streamed_in_row_chunks(tmp_path):
    import torch
    from safetensors.torch import save_file

    x = torch.randn(257, 33).to(torch.bfloat16)
    save_file({"w": x}, str(tmp_path / "m.safetensors"))
    (ref,) = open_checkpoint(tmp_path / "m.safetensors").tensors()
    s = tensor_stats(ref, bins=16, chunk_elements=100)  # about 3 rows per chunk
    _check(s, x.float().numpy(), 16)


def test_big_tensor_histogram_is_a_scaled_strided_sample_and_the_rest_stays_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(-0.2, 1.5, size=(1000, 64)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = 0.0
    x[3, 3] = 30.0
    s = tensor_stats(_ref(x), bins=32, chunk_elements=999, sample_above=5000)
    x64 = x.astype(np.float64)
    stride = -(-x.size // 5000)
    assert s.sample_size == x.reshape(-1)[::stride].size == 4924
    # every statistic but the histogram still covers all the values
    assert s.min == pytest.approx(x.min()) and s.max == 30.0
    assert s.mean == pytest.approx(x64.mean(), rel=1e-6) and s.std == pytest.approx(x64.std(), rel=1e-6)
    assert s.sparsity == pytest.approx(np.mean(x == 0))
    assert s.outliers == pytest.approx(np.mean(np.abs(x64 - x64.mean()) > 6 * x64.std()))
    sample_counts, _ = np.histogram(x.reshape(-1)[::stride], bins=32, range=(s.min, s.max))
    assert s.counts == np.rint(sample_counts * x.size / 4924).astype(int).tolist()
    assert abs(sum(s.counts) - x.size) <= 32  # rounding, at most one per bin
    assert s.to_dict()["histogram"]["sample_size"] == 4924
    exact = tensor_stats(_ref(x), bins=32, chunk_elements=999)
    assert exact.sample_size is None and "sample_size" not in exact.to_dict()["histogram"]
    assert sum(exact.counts) == x.size


def test_every_tensor_of_a_checkpoint_in_order_with_worker_threads():
    model = open_checkpoint("builtin:minilm")
    names = [r.name for r in model.tensors()]
    for workers in (1, 3):
        stats = list(iter_weight_stats(model, bins=8, workers=workers))
        assert [s.name for s in stats] == names
