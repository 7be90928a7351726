"""The runnable examples in the public API's docstrings still run (the others need a trained
model or real data and are marked to be skipped)."""

import doctest
import importlib

import pytest

MODULES = ["ehi.config", "ehi.index.leaf_index", "ehi.model.leaf_sketch", "ehi.results", "ehi.model.ehi_model", "ehi.training.trainer"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_public_api_documents_itself_with_an_example():
    import ehi

    for name in ("EHIModel", "EHIConfig", "train", "Hits"):
        doc = getattr(ehi, name).__doc__ or ""
        assert "Examples\n" in doc and ">>>" in doc, name
