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
    assert stats.mean == pytest.approx(x64.mean(), rel=1e-9, abs=1e-12)
    assert stats.std == pytest.approx(x64.std(), rel=1e-9)
    assert stats.sparsity == pytest.approx(np.mean(x == 0))
    assert stats.outliers == pytest.approx(np.mean(np.abs(x64 - x64.mean()) > 6 * x64.std()))
    counts, edges = np.histogram(x, bins=bins, range=(stats.min, stats.max))
    assert stats.counts == counts.tolist()
    assert np.allclose(stats.edges, edges)
    assert sum(stats.counts) == x.size


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


def test_bfloat16_safetensors_streamed_in_row_chunks(tmp_path):
    import torch
    from safetensors.torch import save_file

    x = torch.randn(257, 33).to(torch.bfloat16)
    save_file({"w": x}, str(tmp_path / "m.safetensors"))
    (ref,) = open_checkpoint(tmp_path / "m.safetensors").tensors()
    s = tensor_stats(ref, bins=16, chunk_elements=100)  # about 3 rows per chunk
    _check(s, x.float().numpy(), 16)
