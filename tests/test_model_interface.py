"""The model seam: every family implements the whole interface, the factory picks families from
model_index.json (and refuses pipelines it does not know), no code outside models/ names a family, and
the package's import graph has no cycle."""

import ast
import json
from pathlib import Path

import pytest

import fewstep
from fewstep.config import ConfigError
from fewstep.models.base import ModelBundle
from fewstep.models.bundle import family_classes, family_of, load_bundle

PKG = Path(fewstep.__file__).resolve().parent


def _hooks() -> list[str]:
    """The methods a family must implement: those the base class leaves raising NotImplementedError."""
    out = []
    for name, fn in vars(ModelBundle).items():
        fn = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
        if callable(fn) and "raise NotImplementedError" in ast.unparse(ast.parse(_source(fn))):
            out.append(name)
    return out


def _source(fn) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(fn))


def test_every_family_implements_the_interface():
    hooks = _hooks()
    assert {"matches", "load", "embed_text", "denoise", "new_denoiser", "feature_tap"} <= set(hooks)
    for cls in family_classes():
        missing = [h for h in hooks if getattr(cls, h) is getattr(ModelBundle, h)]
        assert not missing, f"{cls.__name__} lacks {missing}"
        for attr in ("family", "pipeline_class", "denoiser_name"):
            assert getattr(cls, attr), f"{cls.__name__}.{attr} is empty"
        assert cls.lora_targets


# (QwenImagePipeline's default size is fixed, 128 latents per side: 512 px with the tiny ÷4 VAE)
@pytest.mark.parametrize("builder,resolution", [("build_tiny_sd", 32), ("build_tiny_sdxl", 32), ("build_tiny_sd3", 32),
                                                ("build_tiny_flux", 32), ("build_tiny_qwenimage", 512)])
def test_factory_picks_the_family_from_model_index(builder, resolution, tmp_path):
    from fewstep import testing

    root = getattr(testing, builder)(tmp_path / "t")
    index = json.loads((root / "model_index.json").read_text())
    cls = family_of(str(root))
    assert cls.pipeline_class == index["_class_name"]
    light = load_bundle(str(root), weights=False)  # configs only, as --dry_run reads them
    assert type(light) is cls and light.default_resolution == resolution
    assert light.latent_shape(32, 32) == ({"build_tiny_flux": 16}.get(builder, 4), 8, 8)
    assert cls.family in light.describe()


def test_an_unknown_pipeline_is_refused_by_name(tmp_path):
    """A transformer pipeline of a family fewstep lacks (SANA) is not taken for another family."""
    root = tmp_path / "sana"
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline",
                                                       "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    with pytest.raises(ConfigError, match="SanaPipeline is not a family fewstep supports"):
        load_bundle(str(root), weights=False)


def _modules() -> dict[str, Path]:
    return {".".join(("fewstep", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_no_family_is_named_outside_models():
    """Methods, the trainer and the commands ask the bundle for capabilities; only models/ (and
    fewstep.testing, which builds each family's tiny fixture) knows which families exist."""
    names = set()
    for cls in family_classes():
        names |= {cls.family, cls.pipeline_class, cls.__name__, f"fewstep.models.{cls.__module__.rsplit('.', 1)[1]}"}
    mods = _modules()
    offenders = []
    for name, path in mods.items():
        if name.startswith("fewstep.models") or name == "fewstep.testing":
            continue
        tree = ast.parse(path.read_text())
        offenders += [f"{name}: imports {m}" for m in _imports(name, path, set(mods)) if m in names]
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{name}: the string {node.value!r}")
            elif isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Attribute) and o.attr == "family" for o in operands):
                    offenders.append(f"{name}: compares .family")
    assert not offenders, sorted(set(offenders))


@pytest.mark.parametrize("builder", ["build_tiny_sd", "build_tiny_sdxl", "build_tiny_sd3"])
def test_feature_tap_size_is_the_map_a_forward_gives(builder, tmp_path):
    """Tap.size (what a GAN head is built for) equals the feature map the hooked forward produces."""
    import torch

    from fewstep import testing

    b = load_bundle(str(getattr(testing, builder)(tmp_path / "t")))
    tap = b.feature_tap(b.denoiser)
    seen = []
    tap.attach(lambda f: seen.append(tuple(f.shape)))
    for h, w in [(8, 8), (4, 8), (16, 16)]:
        seen.clear()
        z = torch.randn(1, b.latent_channels, h, w)
        with torch.no_grad():
            b.denoise(b.denoiser, z, b.schedule.timestep(torch.tensor([500])), b.encode_text(["a"], size=(h * 4, w * 4)))
        assert seen == [(1, tap.channels, *tap.size(h, w))], (h, w)
