"""The shared query/document encoder: a sentence-transformer with a chosen trainable scope.

What the frozen part computes is cached on disk, keyed by the model's fingerprint and by
each text: re-encoding SciFact costs minutes on a CPU, re-reading it costs a second, and
another selection of the same texts (a different validation split, say) re-encodes nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ehi.artifacts import write_file_atomic
from ehi.config import PRECOMPUTED, EncoderConfig
from ehi.encode.cache import Features, cache_dir, cache_files, evict_cache, text_keys, texts_fingerprint
from ehi.encode.pretrained import load_sentence_transformer, model_fingerprint
from ehi.progress import LONG, bars, phase

log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Sentence-transformer + residual linear adapter (identity at init), cosine geometry."""

    def __init__(self, config: EncoderConfig, device: str = "cpu"):
        super().__init__()
        config.validate()
        self.config = config
        self.device_name = device
        self.progress = True  # bars for long encodes; Trainer.fit(progress=False) turns them off
        self.precomputed = config.model_name == PRECOMPUTED
        self.st = None if self.precomputed else load_sentence_transformer(config.model_name, device, config.max_seq_length)
        self.dim = config.dim if self.precomputed else self.st.get_embedding_dimension()
        from ehi.encode.onnx import resolve_backend

        self.backend = "torch" if self.precomputed else resolve_backend(config.backend, self.st, config.scope, device)
        self._onnx = None
        self.adapter = nn.Linear(self.dim, self.dim)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self._fingerprint: str | None = PRECOMPUTED if self.precomputed else None
        self.frozen_layers = 0
        if self.precomputed:
            self.to(device)
            return
        bert = self.transformer
        n_layers = len(bert.encoder.layer)
        self.frozen_layers = n_layers - config.top_k_layers if config.scope == "top-k" else n_layers
        if self.frozen_layers < 0:
            raise ValueError(f"top_k_layers={config.top_k_layers} exceeds the model's {n_layers} layers")
        for p in self.st.parameters():
            p.requires_grad_(False)
        if config.scope == "top-k":
            for layer in bert.encoder.layer[self.frozen_layers :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        elif config.scope == "full":
            for p in bert.parameters():
                p.requires_grad_(True)
        self.to(device)

    @property
    def transformer(self):
        return self.st[0].auto_model

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.config.model_name)
        return self._fingerprint

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the base model is referenced by name and fingerprint."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Trained tensors (``trainable_state``) into this encoder; ValueError naming one that
        does not fit."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if k not in params or params[k].shape != v.shape:
                    raise ValueError(f"unexpected tensor {k}")
                params[k].copy_(v)

    # ---- frozen part -------------------------------------------------------------------
    def features(self, texts: list[str], desc: str = "encoding", use_cache: bool = True, by_length: bool = False) -> Features:
        """What the frozen part computes for ``texts``: the texts already in the on-disk cache
        (under any earlier list) are read from it, only the others are computed. ``by_length``
        (uncached only): the ONNX backend batches texts of similar token length (see
        ``OnnxFrozen.encode``): what search does, where a long query must not pad short ones."""
        path = self.cache_path(texts)
        if path is None:
            return Features(texts=list(texts))
        if not use_cache:
            return self.compute_features(texts, desc, by_length)
        cached = self.load_cached(path)
        if cached is not None:
            return cached
        keys = text_keys(texts)
        rows: list = [None] * len(texts)
        like = self._gather_cached(path, keys, rows)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            new_texts = [texts[i] for i in missing]
            new = self.compute_features(new_texts, desc)
            self.save_cached(self.cache_path(new_texts), new, keys[missing])
            for i, r in zip(missing, new.rows()):
                rows[i] = r
            like = new
        return Features.from_rows(rows, like)

    def _gather_cached(self, path: Path, keys: np.ndarray, rows: list) -> Features | None:
        """Fill ``rows`` from this model's cache files (newest first) that hold the texts'
        keys; returns one of them as the layout template (None if none matched)."""
        want: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            want.setdefault(k.tobytes(), []).append(i)
        prefix = path.name.rsplit("-", 2)[0] + "-"
        files = [f for f in cache_files() if f.name.startswith(prefix)]
        like = None
        for f in sorted(files, key=lambda f: f.stat().st_mtime if f.exists() else 0, reverse=True):
            if not want:
                break
            try:
                with np.load(f, allow_pickle=False) as z:
                    if "keys" not in z.files:
                        continue
                    fkeys = z["keys"]
                    hits = [(j, k.tobytes()) for j, k in enumerate(fkeys) if k.tobytes() in want]
                    if not hits:
                        continue
                    feats = self._read(z)
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable feature cache %s (%s)", f, e)
                continue
            like = feats
            frows = feats.rows()
            for j, kb in hits:
                for i in want.pop(kb, []):
                    rows[i] = frows[j]
            try:
                os.utime(f)
            except OSError:
                pass
        return like

    def cache_path(self, texts: list[str]) -> Path | None:
        """Cache file keyed by the model's and the texts' fingerprints (None: nothing to cache)."""
        if self.precomputed:
            raise ValueError(
                "this model was trained on precomputed embeddings: it cannot encode text; "
                "pass query embeddings (EHIModel.search_embeddings)"
            )
        scope = self.config.scope
        if scope == "full":
            return None
        layers = self.frozen_layers if scope == "top-k" else ""
        backend = "" if self.backend == "torch" else f"-{self.backend}"  # onnx-int8's features differ
        key = f"{self.fingerprint}-{scope}{layers}{backend}-L{self.config.max_seq_length}-{texts_fingerprint(texts)}-{len(texts)}"
        return cache_dir() / f"{key}.npz"

    def _read(self, z) -> Features:
        if self.config.scope == "adapter":
            return Features(dense=torch.from_numpy(z["dense"]))
        return Features(states=torch.from_numpy(z["states"]), offsets=torch.from_numpy(z["offsets"]))

    def load_cached(self, path: Path) -> Features | None:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = self._read(z)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
            return None
        try:
            os.utime(path)  # last use, for the least-recently-used eviction
        except OSError:
            pass  # a read-only cache still serves
        return feats

    def save_cached(self, path: Path, feats: Features, keys: np.ndarray | None = None) -> None:
        """``keys`` (``text_keys`` of the texts) let later lists reuse these rows."""
        extra = {} if keys is None else {"keys": keys}
        if feats.dense is not None:
            write_file_atomic(path, lambda fh: np.savez(fh, dense=feats.dense.numpy(), **extra))
        else:
            write_file_atomic(path, lambda fh: np.savez(fh, states=feats.states.numpy(), offsets=feats.offsets.numpy(), **extra))
        evict_cache(keep=path)

    def compute_features(self, texts: list[str], desc: str = "encoding", by_length: bool = False) -> Features:
        if self.config.scope == "full":
            return Features(texts=list(texts))
        if self.config.scope == "adapter":
            return Features(dense=self._encode_frozen_dense(texts, desc, by_length))
        return self._encode_frozen_states(texts, desc)

    def _announce(self, n: int, desc: str) -> bool:
        """Whether to draw a bar for ``n`` texts; a phase line instead when it is long."""
        long = n > LONG and self.progress
        if long and not bars():
            phase(f"{desc}: {n} texts")
        return long and bars()

    def onnx_session(self):
        """The ONNX Runtime encoder of the frozen transformer (exported on first use)."""
        if self._onnx is None:
            from ehi.encode.onnx import OnnxFrozen

            self._onnx = OnnxFrozen(self.st, cache_dir() / "onnx", self.fingerprint, self.config.max_seq_length, int8=self.backend == "onnx-int8")
        return self._onnx

    @torch.no_grad()
    def _encode_frozen_dense(self, texts: list[str], desc: str, by_length: bool = False) -> torch.Tensor:
        if self.backend != "torch":
            show = self._announce(len(texts), desc)
            bar = (lambda it: tqdm(it, desc=desc)) if show else None
            return torch.from_numpy(self.onnx_session().encode(list(texts), self.config.encode_batch_size, bar, by_length))
        emb = self.st.encode(
            list(texts),
            batch_size=self.config.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=self._announce(len(texts), desc),
        )
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        f = self.st.preprocess(list(texts))
        return {k: v.to(self.device_name) for k, v in f.items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def _run_layers(self, x: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        ext = self._additive_mask(mask, x.dtype)
        for layer in layers:
            out = layer(x, attention_mask=ext)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def _lower(self, tok: dict[str, torch.Tensor]) -> torch.Tensor:
        bert = self.transformer
        x = bert.embeddings(input_ids=tok["input_ids"], token_type_ids=tok.get("token_type_ids"))
        return self._run_layers(x, tok["attention_mask"], bert.encoder.layer[: self.frozen_layers])

    @torch.no_grad()
    def _encode_frozen_states(self, texts: list[str], desc: str) -> Features:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        per_doc: list[np.ndarray | None] = [None] * len(texts)
        bs = self.config.encode_batch_size
        was_training = self.transformer.training
        self.transformer.eval()
        for s in tqdm(range(0, len(texts), bs), desc=desc, disable=not self._announce(len(texts), desc)):
            idx = order[s : s + bs]
            tok = self._tokenize([texts[i] for i in idx])
            x = self._lower(tok)
            lens = tok["attention_mask"].sum(1).tolist()
            for j, i in enumerate(idx):
                per_doc[i] = x[j, : lens[j]].to(torch.float16).cpu().numpy()
        self.transformer.train(was_training)
        lengths = np.array([p.shape[0] for p in per_doc])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        states = np.concatenate(per_doc, axis=0)
        return Features(states=torch.from_numpy(states), offsets=torch.from_numpy(offsets))

    # ---- trainable part ----------------------------------------------------------------
    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def embed(self, feats: Features, idx) -> torch.Tensor:
        """Differentiable, L2-normalised embeddings of rows ``idx`` of ``feats``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        dev = self.adapter.weight.device
        if feats.dense is not None:
            e = feats.dense[idx].to(dev)
        elif feats.states is not None:
            starts, ends = feats.offsets[idx], feats.offsets[idx + 1]
            lens = (ends - starts).tolist()
            L = max(lens)
            x = torch.zeros(len(lens), L, self.dim, device=dev)
            mask = torch.zeros(len(lens), L, device=dev, dtype=torch.long)
            for j, (s, n) in enumerate(zip(starts.tolist(), lens)):
                x[j, :n] = feats.states[s : s + n].to(dev, torch.float32)
                mask[j, :n] = 1
            x = self._run_layers(x, mask, self.transformer.encoder.layer[self.frozen_layers :])
            e = self._pool(x, mask)
        else:
            tok = self._tokenize([feats.texts[i] for i in idx.tolist()])
            x = self.transformer(**{k: v for k, v in tok.items() if k != "modality"}).last_hidden_state
            e = self._pool(x, tok["attention_mask"])
        e = F.normalize(e, dim=-1)
        return F.normalize(e + self.adapter(e), dim=-1)

    @torch.no_grad()
    def embed_all(self, feats: Features, batch_size: int = 1024, desc: str | None = None, rows=None) -> np.ndarray:
        """Embeddings of every row (or of ``rows``), float32 numpy, in evaluation mode."""
        was = self.training
        self.eval()
        rows = torch.arange(len(feats)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        n = len(rows)
        bs = batch_size if feats.dense is not None else self.config.encode_batch_size
        out = np.empty((n, self.dim), dtype=np.float32)
        show = desc is not None and n > bs and self.progress and bars()
        for s in tqdm(range(0, n, bs), desc=desc or "embedding", disable=not show):
            out[s : s + bs] = self.embed(feats, rows[s : s + bs]).cpu().numpy()
        self.train(was)
        return out

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        """Final embeddings of precomputed base embeddings (bring-your-own-encoder models)."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.embed_all(Features(dense=F.normalize(t, dim=-1)))

    def encode(self, texts: list[str], use_cache: bool = False) -> np.ndarray:
        """Final embeddings of raw texts (queries at search time)."""
        return self.embed_all(self.features(list(texts), use_cache=use_cache, by_length=not use_cache))
