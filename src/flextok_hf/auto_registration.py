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


class _AfterAutoModuleImport(importlib.abc.MetaPathFinder):
    """Finds transformers' `modeling_auto` like the other finders do, but has its loader import the modeling
    modules once it has run. Removes itself on first use."""

    def find_spec(self, name, path=None, target=None):
        if name != AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            import_modeling_modules()

        spec.loader.exec_module = exec_and_register
        return spec


def register_with_auto_classes_on_import():
    if AUTO_MODULE in sys.modules:
        import_modeling_modules()
    elif not any(isinstance(finder, _AfterAutoModuleImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoModuleImport())
