"""ehi: End-to-end Hierarchical Indexing (Kumar et al., TMLR 2024).

A dense retriever whose tree index is trained together with the encoder.
"""

__version__ = "0.1.0"

# the public API, imported on first use (``import ehi`` stays light)
_PUBLIC = {
    "EHIConfig": "ehi.config",
    "load_beir": "ehi.data",
    "load_corpus": "ehi.data",
    "EHIModel": "ehi.model.ehi_model",
    "Hit": "ehi.results",
    "Hits": "ehi.results",
    "train": "ehi.training.trainer",
    "Trainer": "ehi.training.trainer",
    "tune": "ehi.training.tuning",
    "train_unsupervised": "ehi.training.unsupervised",
    "evaluate_model": "ehi.evaluation.evaluate",
    "run_benchmark": "ehi.benchmark.run",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ehi' has no attribute {name!r}")
