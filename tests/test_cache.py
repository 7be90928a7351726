import os

import numpy as np
import pytest

from ehi.cli import main
from ehi.encode import encoder as enc


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EHI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(cache, name, mib, age):
    cache.mkdir(exist_ok=True)
    p = cache / f"{name}.npz"
    p.write_bytes(b"\0" * (mib << 20))
    t = 1_000_000 + age
    os.utime(p, (t, t))
    return p


def test_cache_evicts_least_recently_used_down_to_its_limit(cache, monkeypatch):
    old, mid, new = _entry(cache, "old", 2, 0), _entry(cache, "mid", 2, 10), _entry(cache, "new", 2, 20)
    monkeypatch.setenv("EHI_CACHE_MAX_GB", str(4.5 / 1024))
    assert enc.evict_cache() == 1
    assert not old.exists() and mid.exists() and new.exists()
    # the file just written is kept even when it alone is over the limit
    monkeypatch.setenv("EHI_CACHE_MAX_GB", "0")
    enc.evict_cache(keep=new)
    assert sorted(p.name for p in cache.iterdir()) == ["new.npz"]


def test_reading_a_cached_file_marks_it_recently_used(cache, tiny_beir, monkeypatch):
    from ehi.config import EncoderConfig

    e = enc.Encoder(EncoderConfig())
    texts = ["a telescope", "an oven"]
    e.features(texts)  # computed and cached
    path = e.cache_path(texts)
    os.utime(path, (1_000_000, 1_000_000))
    _entry(cache, "other", 1, 500)
    e.features(texts)  # read back: now the most recent
    monkeypatch.setenv("EHI_CACHE_MAX_GB", str(0.1 / 1024))
    enc.evict_cache()
    assert path.exists() and not (cache / "other.npz").exists()


def test_changed_weights_in_a_local_model_folder_change_the_cache_key(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights v1")
    before = enc.model_fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"weights v2")
    assert enc.model_fingerprint(str(folder)) != before


def test_cache_info_and_clear(cache, capsys):
    _entry(cache, "a", 1, 0)
    _entry(cache, "b", 1, 1)
    (cache / ".c.npz.123.tmp").write_bytes(b"partial")
    assert main(["cache", "info"]) == 0
    assert "2 files, 2.0 MiB" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "deleted 3 files" in capsys.readouterr().out
    assert list(cache.iterdir()) == []


def test_files_written_atomically_get_ordinary_permissions(tmp_path):
    from ehi.artifacts import write_file_atomic

    umask = os.umask(0o022)
    try:
        p = write_file_atomic(tmp_path / "out" / "results.json", "{}")
    finally:
        os.umask(umask)
    assert p.read_text() == "{}" and (p.stat().st_mode & 0o777) == 0o644


def test_another_selection_of_cached_texts_encodes_only_the_new_ones(cache, monkeypatch):
    """A different validation split or subset re-encodes nothing it has seen: the cache is
    keyed by each text, not only by the whole list."""
    from ehi.config import EncoderConfig

    e = enc.Encoder(EncoderConfig())
    first = ["a telescope", "an oven", "a river delta", "a violin"]
    want = e.features(first).dense.numpy()
    computed = []
    real = e.compute_features
    monkeypatch.setattr(e, "compute_features", lambda texts, desc="": computed.append(list(texts)) or real(texts, desc))
    second = ["a violin", "a glacier", "a telescope", "a violin"]
    got = e.features(second).dense.numpy()
    assert computed == [["a glacier"]]  # only the text never seen
    assert np.array_equal(got[0], want[3]) and np.array_equal(got[2], want[0]) and np.array_equal(got[3], want[3])
    assert np.allclose(got[1], real(["a glacier"]).dense.numpy()[0], atol=1e-6)
    computed.clear()
    again = e.features(["an oven", "a glacier"]).dense.numpy()  # both cached, under two lists
    assert computed == [] and np.array_equal(again[0], want[1]) and np.allclose(again[1], got[1])
