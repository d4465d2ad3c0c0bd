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
