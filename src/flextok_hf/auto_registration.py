"""Registers FlexTok with transformers' `AutoConfig` / `AutoModel` once those are imported, not before.

The modeling modules register their classes when they are imported, but `import flextok_hf` imports none of them
(that would load torch and diffusers). So that `AutoModel.from_pretrained(flextok_folder)` works after a bare
`import flextok_hf` all the same, the modeling modules are imported right after transformers' `modeling_auto`,
which every use of `AutoModel` imports first. transformers has no hook for third-party packages: this is the
smallest import hook that gives one.
"""

import importlib
import importlib.abc
import importlib.machinery
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
    modules once it has run; if diffusers or peft is mid-import then, the same happens after the first module
    imported once they have finished. Removes itself.

    The modeling modules are imported after that module has run, never while it is being found: a module they
    import themselves (a diffusers scheduler, say) would otherwise be run twice, giving two different classes."""

    def __init__(self):
        self.deferred = False

    def find_spec(self, name, path=None, target=None):
        if name != AUTO_MODULE and not (self.deferred and not dependencies_being_imported()):
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if not isinstance(getattr(spec, "loader", None), importlib.machinery.SourceFileLoader):
            sys.meta_path.insert(0, self)  # a built-in or extension module: wait for the next Python module
            return None
        exec_module = spec.loader.exec_module  # this file's own loader: patching it affects no other module

        def exec_and_register(module):
            exec_module(module)
            if dependencies_being_imported():
                self.deferred = True
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
