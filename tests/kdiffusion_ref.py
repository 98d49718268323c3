"""k-diffusion's `sampling.py`, the independent reference for unfog's samplers, loaded from its
wheel (downloaded by .ci/run, not installed: the package's own imports pull torchvision, wandb
and more). Its one import from the rest of the package, `utils.append_dims`, is given here."""

import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import pytest

WHEELS = Path(__file__).resolve().parent.parent / ".cache" / "k-diffusion"


def load_sampling():
    """The `k_diffusion.sampling` module, or a pytest skip saying how to get it."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    for dep in ("scipy", "torchsde", "torchdiffeq"):
        pytest.importorskip(dep)
    wheels = sorted(WHEELS.glob("k_diffusion-*.whl"))
    if not wheels:
        pytest.skip("k-diffusion's wheel is missing: pip download --no-deps k-diffusion==0.1.1.post1 -d .cache/k-diffusion")
    source = zipfile.ZipFile(wheels[-1]).read("k_diffusion/sampling.py").decode()
    package = types.ModuleType("k_diffusion")
    package.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    spec = importlib.util.spec_from_loader("k_diffusion.sampling", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "k_diffusion"
    exec(compile(source, "k_diffusion/sampling.py", "exec"), module.__dict__)
    sys.modules["k_diffusion.sampling"] = module
    return module
