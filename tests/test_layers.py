"""The layer map (docs/architecture.md): each part of unfog imports only the parts below it."""

import ast
from pathlib import Path

import unfog

ROOT = Path(unfog.__file__).parent
BASE = {"errors", "images"}  # used by every layer
ALLOWED = {
    "errors": set(),
    "images": set(),
    "diffusion": set(),
    "nn": set(),
    "data": set(),
    "samplers": {"diffusion"},
    "graphs": {"diffusion"},
    "formats": {"diffusion", "nn"},
    "prompts": set(),  # A1111's prompt syntax: text in, text out
    "threads": set(),  # CPU thread count for a generation
    "text": {"nn", "prompts"},  # prompts → framed token ids, emphasis
    "adapters": {"nn", "formats"},  # LoRA methods of the pipeline
    "embeddings": {"nn", "formats"},  # textual-inversion methods of the pipeline
    "request": {"diffusion", "samplers", "prompts"},
    "offload": {"formats"},  # low-memory mode: networks resting on disk
    "pipeline": {"diffusion", "samplers", "nn", "formats", "graphs", "request", "adapters", "embeddings", "text", "prompts", "threads", "offload"},
    "eval": {"data", "pipeline"},
    "train": {"diffusion", "samplers", "nn", "formats", "data", "graphs", "request", "pipeline", "eval", "adapters", "embeddings", "text", "prompts"},
    "server": {"diffusion", "samplers", "request", "pipeline", "text"},
    "cli": {"diffusion", "samplers", "nn", "formats", "data", "graphs", "request", "pipeline", "eval", "train", "server", "__init__", "prompts", "text", "cli_args"},
    "cli_args": {"diffusion", "samplers", "train", "__init__"},  # the command line's parsers
    "__init__": {"pipeline"},
    "__main__": {"cli"},
}


def unfog_imports(path: Path) -> set[str]:
    """The top-level unfog parts a module imports, lazily inside functions included."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from this module's package, then descend
                parts = list(package[: len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "unfog":
                parts = node.module.split(".")[1:]
            else:
                continue
            # `from .. import samplers` names the parts themselves; anything else is the package's __init__
            found.update([parts[0]] if parts else [a.name if a.name in ALLOWED else "__init__" for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("unfog."))
    return found


def test_every_module_imports_only_lower_layers():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for target in unfog_imports(path) - {layer} - BASE:
            if target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)} imports unfog.{target}")
    assert not wrong, wrong


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    module = ROOT / "nn" / "unet.py"
    assert "errors" in unfog_imports(module)
    fake = ROOT / "nn" / "_layer_probe.py"
    fake.write_text("def f():\n    from ..pipeline import Pipeline\n    from .. import samplers\n")
    try:
        assert {"pipeline", "samplers"} <= unfog_imports(fake)
    finally:
        fake.unlink()
