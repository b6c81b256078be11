"""Tiny random Hugging Face ``transformers`` models exported to ONNX (issue 13, "LLM-style graphs").

Every model is built from a small config with random weights (seeded; nothing is downloaded),
parameters whose entries are all equal (RMSNorm/LayerNorm ones, zero biases) re-randomised so that
the exporter does not de-duplicate them into artificial weight sharing, eager attention, no KV cache,
then exported with the torch.export-based exporter (the TorchScript exporter fails on these models
with transformers 4.57: ``RuntimeError: unordered_map::at``) at opset 18 (at 17 it writes a Split
with ``num_outputs`` that onnxruntime rejects), batch and sequence axes dynamic. Exports are cached
like :func:`onnxprune.models.zoo.export`.

| arch | model | graph inputs | output |
| --- | --- | --- | --- |
| ``llama`` | ``LlamaModel``, grouped-query attention (8 query heads, 2 KV heads), RoPE, RMSNorm, SwiGLU | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` |
| ``qwen2`` | ``Qwen2Model`` (GQA, q/k/v biases) | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` |
| ``gpt2`` | ``GPT2Model`` (Conv1D weights [in, out], fused qkv split) | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` |
| ``bert`` | ``BertModel`` (no pooler) | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` |
| ``t5`` | ``T5EncoderModel`` (relative position bias shared by all layers) | ``input_ids``, ``attention_mask`` | ``last_hidden_state`` |
| ``whisper`` | ``WhisperEncoder`` on any number of frames (position table sliced) | ``input_features`` [b, mels, frames] | ``last_hidden_state`` |
| ``wav2vec2`` | ``Wav2Vec2Model`` (conv feature encoder, positional grouped conv) | ``input_values`` [b, samples] | ``last_hidden_state`` |

Command line::

    python -m onnxprune.models.hf llama
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnxprune.models import zoo

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2", "bert", "t5", "whisper", "wav2vec2")
#: Bump when a build recipe here changes, so stale cache entries are not reused.
HF_FORMAT = 1
SEED = zoo.SEED
OPSET = 18
VOCAB = 128
MAX_POSITIONS = 128
#: Example sizes while tracing (> 1 avoids 0/1 specialisation of the dynamic axes).
TRACE_BATCH = 2
TRACE_SEQ = 8
#: Whisper: mel bins; the encoder's two convolutions halve the frames once (stride 2).
WHISPER_MELS = 16
#: Wav2Vec2: the feature encoder's kernels and strides (samples -> frames: 5*2*2 = 20 per frame).
W2V_KERNELS = (10, 3, 3)
W2V_STRIDES = (5, 2, 2)
OUTPUT = "last_hidden_state"
_TEXT = frozenset({"llama", "qwen2", "gpt2", "bert", "t5"})

#: The tiny configs. ``heads``/``kv_heads``/``intermediate``/``layers``/``hidden`` are read by tests to
#: know independently of the ONNX file how many heads and MLP units a ratio removes.
CONFIGS: dict[str, dict[str, int]] = {
    "llama": {"hidden": 64, "heads": 8, "kv_heads": 2, "intermediate": 128, "layers": 2},
    "qwen2": {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 96, "layers": 2},
    "gpt2": {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 256, "layers": 2},
    "bert": {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128, "layers": 2},
    "t5": {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128, "layers": 2},
    "whisper": {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128, "layers": 2},
    "wav2vec2": {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128, "layers": 2},
}


def _require_transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"onnxprune.models.hf needs torch and transformers ({exc}); "
            "install them with: pip install 'onnxprune[hf]'") from None
    return transformers


def _hf_config(arch: str):
    tr = _require_transformers()
    c = CONFIGS[arch]
    h, heads, kv, inter, layers = c["hidden"], c["heads"], c["kv_heads"], c["intermediate"], c["layers"]
    if arch == "llama":
        cfg = tr.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                             max_position_embeddings=MAX_POSITIONS)
    elif arch == "qwen2":
        cfg = tr.Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                             max_position_embeddings=MAX_POSITIONS, use_sliding_window=False)
    elif arch == "gpt2":
        cfg = tr.GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_inner=inter, vocab_size=VOCAB,
                            n_positions=MAX_POSITIONS)
    elif arch == "bert":
        cfg = tr.BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS)
    elif arch == "t5":
        cfg = tr.T5Config(d_model=h, d_kv=h // heads, d_ff=inter, num_layers=layers, num_heads=heads,
                          vocab_size=VOCAB, feed_forward_proj="relu")
    elif arch == "whisper":
        cfg = tr.WhisperConfig(d_model=h, encoder_layers=layers, encoder_attention_heads=heads,
                               encoder_ffn_dim=inter, num_mel_bins=WHISPER_MELS, max_source_positions=MAX_POSITIONS,
                               vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)
    elif arch == "wav2vec2":
        cfg = tr.Wav2Vec2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=inter, conv_dim=(32,) * len(W2V_KERNELS),
                                conv_kernel=W2V_KERNELS, conv_stride=W2V_STRIDES, num_conv_pos_embeddings=16,
                                num_conv_pos_embedding_groups=4, vocab_size=VOCAB, do_stable_layer_norm=False,
                                feat_extract_norm="group", apply_spec_augment=False)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    cfg._attn_implementation = "eager"
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def _wrapper(arch: str, inner: nn.Module) -> nn.Module:
    """A module taking the graph inputs of ``arch`` positionally and returning ``last_hidden_state``."""
    import torch
    from torch import nn

    class Text(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            kw = {"use_cache": False} if arch in ("llama", "qwen2", "gpt2") else {}
            return self.m(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state

    class Whisper(nn.Module):
        """``WhisperEncoder.forward`` without its "exactly 2 * max_source_positions frames" check: the
        position table is sliced to the frames the convolutions produce (as for short audio)."""

        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            enc = self.m
            x = nn.functional.gelu(enc.conv1(input_features))
            x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[: x.shape[1]]
            for layer in enc.layers:
                x = layer(x, None, layer_head_mask=None)[0]
            return enc.layer_norm(x)

    class Audio(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            return self.m(input_values=input_values).last_hidden_state

    if arch in _TEXT:
        return Text(inner)
    return Whisper(inner) if arch == "whisper" else Audio(inner)


def build(arch: str, *, seed: int = SEED) -> nn.Module:
    """The wrapped tiny random model of ``arch`` (seeded, constant parameters re-randomised, eval)."""
    tr = _require_transformers()
    import torch

    cfg = _hf_config(arch)
    with torch.random.fork_rng(devices=[]), zoo._quiet():
        torch.manual_seed(seed)
        if arch == "llama":
            inner = tr.LlamaModel(cfg)
        elif arch == "qwen2":
            inner = tr.Qwen2Model(cfg)
        elif arch == "gpt2":
            inner = tr.GPT2Model(cfg)
        elif arch == "bert":
            inner = tr.BertModel(cfg, add_pooling_layer=False)
        elif arch == "t5":
            inner = tr.T5EncoderModel(cfg)
        elif arch == "whisper":
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            inner = WhisperEncoder(cfg)
        else:
            inner = tr.Wav2Vec2Model(cfg)
    zoo.randomize_constant_params(inner, seed=seed)
    return _wrapper(arch, inner).eval()


def input_names(arch: str) -> tuple[str, ...]:
    if arch in _TEXT:
        return ("input_ids", "attention_mask")
    return ("input_features",) if arch == "whisper" else ("input_values",)


def example_inputs(arch: str, batch: int, seq: int, *, seed: int = SEED) -> dict[str, np.ndarray]:
    """Feeds of ``arch`` for ``batch`` sequences of ``seq`` positions (tokens, mel frames, or output
    frames of the wav2vec2 feature encoder: :func:`w2v_samples` samples). Text: random ids in [1, VOCAB),
    the attention mask of row i ends in min(i, seq - 1) padded positions."""
    rng = np.random.default_rng(seed)
    if arch in _TEXT:
        ids = rng.integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for i in range(batch):
            n = max(1, seq - i)
            mask[i, n:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if arch == "whisper":
        return {"input_features": rng.standard_normal((batch, WHISPER_MELS, seq)).astype(np.float32)}
    return {"input_values": rng.standard_normal((batch, w2v_samples(seq))).astype(np.float32)}


def w2v_samples(frames: int) -> int:
    """Fewest samples the wav2vec2 feature encoder turns into ``frames`` frames."""
    n = frames
    for k, s in reversed(list(zip(W2V_KERNELS, W2V_STRIDES, strict=True))):
        n = (n - 1) * s + k
    return n


def _export_module(arch: str, model: nn.Module, dest: pathlib.Path) -> None:
    import torch

    feeds = example_inputs(arch, TRACE_BATCH, TRACE_SEQ * (2 if arch == "whisper" else 1))
    names = input_names(arch)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    batch = torch.export.Dim("batch", max=1024)
    if arch == "wav2vec2":
        seq = torch.export.Dim.AUTO
    elif arch == "whisper":
        seq = 2 * torch.export.Dim("half", min=2, max=MAX_POSITIONS)
    else:
        seq = torch.export.Dim("seq", min=2, max=MAX_POSITIONS)
    dyn = {n: {0: batch, (2 if arch == "whisper" else 1): seq} for n in names}
    with zoo._quiet():
        program = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET, input_names=list(names),
                                    output_names=[OUTPUT], dynamic_shapes=dyn, external_data=False,
                                    optimize=True, verbose=False, report=False)
        program.save(str(dest), external_data=False)
    zoo._inline_functions(dest)
    m = onnx.load(str(dest))
    onnx.checker.check_model(m, full_check=True)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        axes = (0, 2) if arch == "whisper" else (0, 1)
        if any(dims[a].HasField("dim_value") for a in axes):
            raise RuntimeError(f"{arch}: the exporter made input {vi.name} static: {dims}")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}


def cache_path(arch: str, *, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    import transformers

    tag = transformers.__version__.replace("/", "_")
    return zoo.cache_root(cache_dir) / f"hf-{arch}-tf{tag}-torch{zoo._torch_tag()}-opset{OPSET}-h{HF_FORMAT}.onnx"


def export(arch: str, *, cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> pathlib.Path:
    """Export the tiny random ``arch`` (cached, atomic) and return the path of its ONNX file."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    _require_transformers()
    path = cache_path(arch, cache_dir=cache_dir)
    if path.exists() and not force:
        logger.debug("cache hit: %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build(arch)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        _export_module(arch, model, tmp)
        meta = {"name": arch, "exporter": "dynamo", "opset": OPSET, "config": CONFIGS[arch],
                "inputs": list(input_names(arch)), "dynamic_batch": True, "dynamic_seq": True, "seed": SEED,
                "hf_format": HF_FORMAT, "export_seconds": round(time.perf_counter() - start, 3), **_versions()}
        zoo._atomic_write_text(zoo.meta_path(path), json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, zoo._FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info("exported %s in %.1f s -> %s", arch, time.perf_counter() - start, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m onnxprune.models.hf", description=__doc__.splitlines()[0])
    p.add_argument("arch", nargs="+", choices=ARCHS)
    p.add_argument("--cache-dir")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    for arch in args.arch:
        print(export(arch, cache_dir=args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["ARCHS", "CONFIGS", "build", "cache_path", "example_inputs", "export", "input_names"]
