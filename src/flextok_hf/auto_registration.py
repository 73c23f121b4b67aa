"""Registers FlexTok with transformers' `AutoConfig` / `AutoModel` once those are imported, not before.

The modeling modules register their classes when they are imported, but `import flextok_hf` imports none of them
(that would load torch and diffusers). So that `AutoModel.from_pretrained(flextok_folder)` works after a bare
`import flextok_hf` all the same, the modeling modules are imported right after transformers' `modeling_auto`,
which every use of `AutoModel` imports first. transformers has no hook for third-party packages: this is the
smallest import hook that gives one.
"""

import importlib
import importlib.abc
import importlib.util
import sys

AUTO_MODULE = "transformers.models.auto.modeling_auto"
MODELING_MODULES = ("flextok_hf.modeling_flextok", "flextok_hf.modeling_flextok_ar")


def import_modeling_modules():
    # A modeling module being imported right now (it imports transformers' Auto classes itself) is returned as it
    # is and registers its classes when it finishes.
    for name in MODELING_MODULES:
        importlib.import_module(name)


def dependencies_being_imported() -> bool:
    """Whether diffusers or peft is in the middle of its own import. With peft installed, diffusers imports peft,
    which imports transformers' Auto classes: importing our modeling modules (which need diffusers) at that moment
    would break diffusers' import."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] in ("diffusers", "peft")
    )


class _AfterAutoModuleImport(importlib.abc.MetaPathFinder):
    """Finds transformers' `modeling_auto` like the other finders do, but has its loader import the modeling
    modules once it has run, or at the first import after diffusers' when that is under way. Removes itself."""

    def __init__(self):
        self.auto_module_loaded = False

    def find_spec(self, name, path=None, target=None):
        if self.auto_module_loaded:
            # Deferred: a later import, once diffusers and peft have finished theirs.
            if not dependencies_being_imported():
                sys.meta_path.remove(self)
                import_modeling_modules()
            return None
        if name != AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if dependencies_being_imported():
                self.auto_module_loaded = True
                sys.meta_path.insert(0, self)
            else:
                import_modeling_modules()

        spec.loader.exec_module = exec_and_register
        return spec


def register_with_auto_classes_on_import():
    if AUTO_MODULE in sys.modules:
        import_modeling_modules()
    elif not any(isinstance(finder, _AfterAutoModuleImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoModuleImport())
