"""The frozen transformer on ONNX Runtime: same embeddings as torch, its own cache entries."""

import numpy as np
import pytest

from ehi.config import EncoderConfig
from ehi.encode.encoder import Encoder

TEXTS = ["Exposure to fine particulate air pollution is related to anxiety.", "short", "word " * 300]


@pytest.fixture(scope="module")
def torch_encoder():
    return Encoder(EncoderConfig(backend="torch"))


def test_onnx_embeddings_equal_torch_and_int8_stays_close(torch_encoder):
    onnx = Encoder(EncoderConfig())  # auto: ONNX Runtime in the adapter scope on the CPU
    assert onnx.backend == "onnx" and torch_encoder.backend == "torch"
    ref = torch_encoder.encode(TEXTS)
    np.testing.assert_allclose(onnx.encode(TEXTS), ref, atol=1e-5)  # truncation and padding included
    int8 = Encoder(EncoderConfig(backend="onnx-int8"))
    cos = (int8.encode(TEXTS) * ref).sum(1)
    assert (cos > 0.8).all() and (cos < 0.9999).any()  # quantized: close, not equal


def test_feature_cache_keys_on_the_backend(torch_encoder):
    onnx = Encoder(EncoderConfig(backend="onnx"))
    paths = {torch_encoder.cache_path(TEXTS), onnx.cache_path(TEXTS), Encoder(EncoderConfig(backend="onnx-int8")).cache_path(TEXTS)}
    assert len(paths) == 3


def test_onnx_runs_only_where_it_can():
    assert Encoder(EncoderConfig(scope="top-k")).backend == "torch"  # auto falls back
    with pytest.raises(ValueError, match="adapter scope"):
        Encoder(EncoderConfig(scope="top-k", backend="onnx"))
    with pytest.raises(ValueError, match="backend"):
        EncoderConfig(backend="tensorrt").validate()
