"""Import the pack under a fixed package name (`editkit`), whatever its folder is called."""
import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def import_pack(name: str = "editkit"):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_script(relative_path: str):
    """A script of the repository (tools/, benchmarks/) as a module, loaded once and kept in sys.modules under its
    file name (a script that dataclasses or pickles its own types needs that)."""
    path = REPO_ROOT / relative_path
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
