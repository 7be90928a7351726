"""ehi: End-to-end Hierarchical Indexing (Kumar et al., TMLR 2024).

A dense retriever whose tree index is trained together with the encoder.
"""

__version__ = "0.1.0"
