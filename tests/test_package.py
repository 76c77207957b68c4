"""The package's public names, loaded on first use (backbone/__init__.py)."""

from __future__ import annotations

import subprocess
import sys

import backbone


def test_every_public_name_is_known_and_loads():
    # __all__ and the lazy table list the same names; each resolves to its module's object
    assert sorted(backbone.__all__) == sorted(backbone._WHERE)
    for name in backbone.__all__:
        value = getattr(backbone, name)
        where = backbone._WHERE[name]
        module = sys.modules[f"backbone.{where or name}"]
        assert value is (module if not where else getattr(module, name))
    assert set(backbone.__all__) <= set(dir(backbone))


def test_importing_the_package_loads_no_transport():
    code = "import sys, backbone; print('backbone.server' in sys.modules, 'aioquic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
