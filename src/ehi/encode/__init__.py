"""Encoding: the sentence-transformer, its adapter and backends, and the feature cache."""

from ehi.encode.encoder import Encoder

__all__ = ["Encoder"]
