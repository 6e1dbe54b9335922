"""`import streaming` without its dataset zoo: streaming/__init__.py imports streaming.text, .vision and
.multimodal (ready-made C4, ImageNet, COCO … classes), which pull in transformers' tokenizers,
torchvision's models and scikit-learn: more than half of what `import streaming` costs (seconds per
command). Nothing here uses them. `defer()` puts a stand-in for each of the three in sys.modules before
streaming is first imported; the first use of anything in one (an attribute it lacks: a dataset class,
a submodule) imports the real module and hands it out from then on, so a user of the zoo sees no
difference. (importlib's LazyLoader does not stay lazy: the import system and torch's source lookups
touch `__spec__` / `__file__` of every module.)

ditscale.data's package import calls it, so the readers, data_prep and the trainer all get it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

ZOO = ("text", "vision", "multimodal")


class _Deferred(types.ModuleType):
    """Stands in for a zoo subpackage until something asks it for what only the real one has."""

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        setattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2], real)
        self.__dict__.update(real.__dict__)  # those who kept the stand-in see the real contents too
        return getattr(real, attr)


def defer() -> None:
    """Defer streaming's dataset zoo; a no-op once streaming is imported or where it is not installed."""
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")  # a top-level find executes nothing
    if spec is None or not spec.submodule_search_locations:
        return
    base = list(spec.submodule_search_locations)[0]
    for sub in ZOO:
        name, folder = f"streaming.{sub}", os.path.join(base, sub)
        init = os.path.join(folder, "__init__.py")
        if name in sys.modules or not os.path.isfile(init):
            continue
        module = _Deferred(name)
        module.__file__, module.__path__, module.__package__ = init, [folder], name
        module.__spec__ = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        sys.modules[name] = module
