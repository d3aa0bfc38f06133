"""The moved-module alias that lets verl 0.9.1 decode SGLang 0.5.17's routed experts.

SGLang itself cannot be imported here (its wheels need CUDA), so each test lays out
the two module paths in a temporary package tree and imports through the real
import machinery.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from trainer_bridge.verl import sglang_compat

OLD, NEW = "fakesgl.layers.moe.routed_experts_capturer", "fakesgl.state_capturer.routed_experts"


def write(root: Path, module: str, text: str) -> None:
    parts = module.split(".")
    for i in range(1, len(parts)):
        pkg = root.joinpath(*parts[:i])
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").touch()
    root.joinpath(*parts[:-1], parts[-1] + ".py").write_text(text)


@pytest.fixture
def package_root(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_meta_path = list(sys.meta_path)
    yield tmp_path
    sys.meta_path[:] = saved_meta_path
    for name in [n for n in sys.modules if n == "fakesgl" or n.startswith("fakesgl.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_old_name_imports_the_moved_module(package_root):
    write(package_root, NEW, "def extract_routed_experts_from_meta_info(data):\n    return 'new'\n")
    (package_root / "fakesgl" / "layers" / "moe").mkdir(parents=True)
    (package_root / "fakesgl" / "layers" / "__init__.py").touch()
    (package_root / "fakesgl" / "layers" / "moe" / "__init__.py").touch()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(OLD)
    sglang_compat.install({OLD: NEW})
    from fakesgl.layers.moe.routed_experts_capturer import extract_routed_experts_from_meta_info  # the line verl runs

    assert extract_routed_experts_from_meta_info(None) == "new"
    assert sys.modules[OLD] is sys.modules[NEW]


def test_an_existing_old_module_is_left_alone(package_root):
    write(package_root, NEW, "WHO = 'new'\n")
    write(package_root, OLD, "WHO = 'old'\n")
    sglang_compat.install({OLD: NEW})
    assert importlib.import_module(OLD).WHO == "old"


def test_nothing_to_alias_stays_an_import_error(package_root):
    (package_root / "fakesgl").mkdir()
    (package_root / "fakesgl" / "__init__.py").touch()
    sglang_compat.install({"fakesgl.gone": "fakesgl.also_gone"})
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fakesgl.gone")


def test_install_is_idempotent(package_root):
    before = len(sys.meta_path)
    sglang_compat.install({OLD: NEW})
    sglang_compat.install({OLD: NEW})
    assert len(sys.meta_path) == before + 1


def test_verl_still_imports_the_old_name():
    """The alias is for this exact import in verl's SGLang server; if verl changes it, this says so."""
    spec = importlib.util.find_spec("verl")
    if spec is None:
        pytest.skip("verl is not installed")
    server = Path(spec.origin).parent / "workers" / "rollout" / "sglang_rollout" / "async_sglang_server.py"
    source = server.read_text()
    assert "from sglang.srt.layers.moe.routed_experts_capturer import extract_routed_experts_from_meta_info" in source
    assert set(sglang_compat.MOVED_MODULES) == {"sglang.srt.layers.moe.routed_experts_capturer"}
