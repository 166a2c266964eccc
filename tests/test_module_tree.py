"""The Model tab's breakdown and `model-studio inspect` count bytes with one table and one default."""

from __future__ import annotations

from studio.checkpoints.base import TensorRef
from studio.inspection.module_tree import whole_model_summary
from studio.inspection.stats import ModelSummary


def _ref(name: str, shape: tuple[int, ...], dtype: str) -> TensorRef:
    def load():  # headers only: nothing here may read a tensor
        raise AssertionError(f"{name} was read")

    return TensorRef(name, shape, dtype, load)


def test_whole_model_bytes_match_the_inspect_summary():
    refs = [
        _ref("encoder.layer.0.attention.self.query.weight", (8, 8), "float32"),
        _ref("encoder.layer.0.attention.self.query.bias", (8,), "bfloat16"),
        _ref("encoder.layer.1.attention.self.query.weight", (8, 8), "qint32"),
        _ref("embeddings.word_embeddings.weight", (10, 8), "float4_e2m1"),  # a dtype the table lacks
    ]
    summary = whole_model_summary(refs)
    inspect = ModelSummary()
    for ref in refs:
        inspect.add(ref)
    by_dtype = {dtype: row[2] for dtype, row in summary["by_dtype"]}
    assert by_dtype == inspect.bytes_by_dtype
    assert by_dtype["float32"] == 64 * 4 and by_dtype["qint32"] == 64 * 4 and by_dtype["bfloat16"] == 16
    assert by_dtype["float4_e2m1"] == 80  # unknown: one byte per value, never more than it can take
    assert summary["bytes"] == inspect.bytes
    assert dict(summary["by_type"])["attention.self.query"] == 64 + 8 + 64
