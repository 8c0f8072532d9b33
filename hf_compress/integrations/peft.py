"""PEFT integration: LoRA on models quantized by hf_compress works with plain `get_peft_model`.

PEFT builds a LoRA layer for a target module through a chain of dispatchers that only know `nn.Linear` and the
quantized types of other libraries. `register_with_peft` puts one dispatcher in front of that chain: it wraps
`QuantLinear` modules in `hf_compress.integrations.peft_layers.QuantLoraLinear` and hands every other module to PEFT unchanged.
(PEFT's experimental ``LoraConfig._register_custom_module`` does the same per config object, but is not saved in
``adapter_config.json``, so `PeftModel.from_pretrained` would fail on reload; a dispatcher registered once per
process covers `get_peft_model`, `PeftModel.from_pretrained`, ``model.add_adapter`` and ``model.load_adapter``.)

``import hf_compress`` calls `install`, which never imports PEFT itself: it registers at once if PEFT is already
imported, and otherwise registers right after PEFT's own import finishes (an import hook), so ``import hf_compress``
stays light and the order of the two imports does not matter.

Private internals: ``LoraModel._create_new_module`` (wrapped), checked on peft 0.21.2.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading


__all__ = ["install", "register_with_peft", "is_registered"]

_lock = threading.Lock()
_MARK = "_hf_compress_dispatch"


def is_registered() -> bool:
    """Whether PEFT's LoRA already knows hf_compress layers (without importing PEFT)."""
    module = sys.modules.get("peft.tuners.lora.model")
    return module is not None and getattr(module.LoraModel._create_new_module, _MARK, False)


def register_with_peft() -> None:
    """Teach PEFT's LoRA to wrap hf_compress quantized layers. Idempotent; imports PEFT.

    Called automatically (see `install`); call it yourself only if you replaced PEFT's LoRA model class.
    """
    with _lock:
        from peft.tuners.lora import model as lora_model

        original = lora_model.LoraModel._create_new_module
        if getattr(original, _MARK, False):
            return

        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            # A user's own custom-module mapping wins; then ours; then PEFT's dispatchers.
            if not _user_custom_match(lora_config, target):
                from .peft_layers import dispatch_quantized

                new_module = dispatch_quantized(target, adapter_name, lora_config, **kwargs)
                if new_module is not None:
                    return new_module
            return original(lora_config, adapter_name, target, **kwargs)

        setattr(_create_new_module, _MARK, True)
        _create_new_module.__wrapped__ = original
        lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)


def _user_custom_match(lora_config, target) -> bool:
    custom = getattr(lora_config, "_custom_modules", None) or {}
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    return any(isinstance(base, key) for key in custom)


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Import hook: when ``peft`` is imported, run `register_with_peft` right after its ``__init__`` has run.

    Availability checks (``importlib.util.find_spec("peft")``, as transformers does) also reach this finder; they
    get a spec whose loader registers *if* it is ever executed, and the hook stays until a real import happens.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        spec = None
        for finder in list(sys.meta_path):  # the other finders, so we never recurse into ourselves
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _remove_hook()
            try:
                register_with_peft()
            except Exception as err:  # never break `import peft` because of us
                import warnings

                warnings.warn(f"hf_compress could not register its LoRA layers with PEFT: {err!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


_hook = _RegisterAfterPeftImport()


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register with PEFT now if it is imported, else as soon as it is. Does not import PEFT."""
    if "peft" in sys.modules:
        register_with_peft()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
