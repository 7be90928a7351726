"""The frozen transformer of the ``adapter`` scope on ONNX Runtime.

A query waits mostly for the transformer (MiniLM in eager torch: ≈ 10 ms of CPU each); the
same graph on ONNX Runtime gives the same embeddings (to 1e-7) in less than half of it, and
its dynamically quantized int8 version faster still, a little less exactly. The graph is
exported once per base model with ``torch.onnx`` from the weights already loaded (no
download), mean pooling included, and kept in the feature cache's folder (``onnx/``).
Training keeps torch wherever it needs gradients: only the frozen part runs here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def unsupported(st, scope: str, device: str) -> str | None:
    """Why this model cannot run its frozen part on ONNX Runtime here (None: it can)."""
    if scope != "adapter":
        return f"scope {scope!r} trains transformer layers (the ONNX backend runs the frozen transformer of the adapter scope)"
    if not device.startswith("cpu"):
        return f"device {device} (ONNX Runtime runs on the CPU here)"
    try:
        import onnxruntime  # noqa: F401  (only: is it there)
    except ImportError:
        return "onnxruntime is not installed"
    names = [type(m).__name__ for m in st]
    if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
        return f"its modules are {names} (supported: Transformer, Pooling[, Normalize])"
    pooling = st[1].get_config_dict() if hasattr(st[1], "get_config_dict") else {}
    mode = pooling.get("pooling_mode") or ("mean" if pooling.get("pooling_mode_mean_tokens") else None)
    if mode not in ("mean", "mean_tokens"):
        return f"its pooling is {mode or pooling} (supported: mean)"
    return None


def resolve_backend(backend: str, st, scope: str, device: str) -> str:
    """The backend an encoder uses: ``auto`` is ``onnx`` wherever it can run, else torch; an
    explicit ONNX backend that cannot run is a ValueError saying why (``EncoderConfig``
    validates the name)."""
    if backend == "torch" or st is None:
        return "torch"
    why = unsupported(st, scope, device)
    if why is None:
        return "onnx" if backend == "auto" else backend
    if backend == "auto":
        return "torch"
    raise ValueError(f"encoder backend {backend!r} cannot run: {why}; use 'torch'")


class _Pooled(torch.nn.Module):
    """The transformer and mean pooling as one traced module (what the ONNX graph holds)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


@contextlib.contextmanager
def _quiet_tools():
    """torch.onnx's tracer notes about the model's Python control flow and the quantizer's
    root-logger advice are facts about the export, not the user's to act on."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export(st, path: Path, int8: bool) -> Path:
    """Write the frozen transformer + mean pooling as ONNX (int8: dynamically quantized);
    atomic: a crash leaves no half-written graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fp32 = path.with_name(path.name.replace("-int8", "")) if int8 else path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _quiet_tools():
        if int8:
            if not fp32.exists():
                export(st, fp32, False)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        else:
            bert = st[0].auto_model
            was = bert.training
            bert.eval()
            tok = st.tokenizer(["an example", "a second, longer example text"], padding=True, return_tensors="pt")
            args = tuple(tok.get(k, torch.zeros_like(tok["input_ids"])) for k in INPUTS)
            axes = {k: {0: "batch", 1: "tokens"} for k in INPUTS} | {"pooled": {0: "batch"}}
            with torch.no_grad():
                torch.onnx.export(_Pooled(bert), args, str(tmp), input_names=list(INPUTS), output_names=["pooled"],
                                  dynamic_axes=axes, opset_version=17, dynamo=False)
            bert.train(was)
    os.replace(tmp, path)
    return path


class OnnxFrozen:
    """Sentence embeddings of the frozen transformer from an ONNX Runtime session."""

    def __init__(self, st, folder: Path, fingerprint: str, max_seq_length: int, int8: bool = False):
        import onnxruntime as ort

        self.tokenizer = st.tokenizer
        self.max_len = min(max_seq_length, st.max_seq_length or max_seq_length)
        path = Path(folder) / f"{fingerprint}-L{self.max_len}{'-int8' if int8 else ''}.onnx"
        if not path.exists():
            export(st, path, int8)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: its graph-optimizer notes are not actionable
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = path

    def encode(self, texts: list[str], batch_size: int = 64, bar=None, by_length: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, in order; batches of texts sorted by length (less
        padding). ``by_length``: sorted by length in tokens, and a batch also ends where the
        next text is under half its longest, so that one long text never pads a batch of
        short ones to its length (the server's micro-batches mix 2,000-character queries with
        3-word ones: 15x faster for one such query among 31 short ones). Batch composition
        moves embeddings by ~1e-8, so training keeps the plain order, whose features are
        cached."""
        if by_length:
            lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_len)["input_ids"]]
        else:
            lengths = [len(t) for t in texts]
        order = np.argsort([-n for n in lengths], kind="stable")
        batches: list[list[int]] = []
        for i in order:
            if not batches or len(batches[-1]) >= batch_size or (by_length and 2 * lengths[i] < lengths[batches[-1][0]]):
                batches.append([])
            batches[-1].append(i)
        chunks = []
        for idx in (bar(batches) if bar else batches):
            tok = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_len, return_tensors="np")
            feed = {k: tok[k].astype(np.int64) if k in tok else np.zeros_like(tok["input_ids"], dtype=np.int64) for k in INPUTS}
            chunks.append(self.session.run(None, feed)[0])
        emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        out = np.empty_like(emb)
        out[order] = emb  # the batches are consecutive runs of ``order``
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)
