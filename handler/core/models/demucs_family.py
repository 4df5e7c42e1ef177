"""The demucs family, loaded by demucs's own code from a local model repository.

``MODELS_DIR`` is a folder in demucs's local-repo format (what ``demucs --repo DIR -n NAME``
reads: ``<sig>-<checksum>.th`` weights plus ``<name>.yaml`` bags), baked at image build time
by ``builder/bake_models.py``. Nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import warnings

import torch

from handler.config import models_dir
from handler.core.models.base import LoadedModel, Member
from handler.errors import ModelUnavailable

log = logging.getLogger(__name__)

DEMUCS_MODELS = (
    "htdemucs", "htdemucs_ft", "htdemucs_6s", "hdemucs_mmi",
    "mdx", "mdx_extra", "mdx_q", "mdx_extra_q",
)


def _bake_hint(name: str) -> str:
    # --dest spelled out: the folder this process reads, whatever MODELS_DIR says.
    return (f"bake it with `python builder/bake_models.py --models {name} --dest "
            f"{models_dir()}` (image build arg MODELS={name})")


def _no_diffq(name: str) -> str:
    return (f"model {name!r} is quantized and needs diffq, which is not installed (the images "
            "install the wheel builder/build_diffq.sh builds)")


def load_demucs(name: str, device: torch.device) -> LoadedModel:
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs
    from demucs.repo import AnyModelRepo, BagOnlyRepo, LocalRepo, ModelLoadingError

    repo = models_dir()
    if not repo.is_dir():
        raise ModelUnavailable(f"model {name!r} is not baked: MODELS_DIR {repo} does not exist; "
                               + _bake_hint(name))
    try:
        local = LocalRepo(repo)
        any_repo = AnyModelRepo(local, BagOnlyRepo(repo, local))
        if not any_repo.has_model(name):
            raise ModelUnavailable(f"model {name!r} is not baked into MODELS_DIR; "
                                   + _bake_hint(name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = any_repo.get_model(name)
    except ModelLoadingError as exc:  # a bag names weights that are missing or corrupt
        raise ModelUnavailable(
            f"model {name!r} cannot be loaded ({exc}); {_bake_hint(name)}") from None
    except ImportError as exc:
        if "diffq" in str(exc):
            raise ModelUnavailable(_no_diffq(name)) from None
        raise ModelUnavailable(
            f"model {name!r} needs a package that is not installed ({exc})") from None
    except SystemExit:  # demucs's set_state exits the process when it finds no diffq
        raise ModelUnavailable(_no_diffq(name)) from None
    model.eval()

    networks = list(model.models) if isinstance(model, BagOfModels) else [model]
    weights = model.weights if isinstance(model, BagOfModels) else [[1.0] * len(model.sources)]
    members = []
    for net, net_weights in zip(networks, weights, strict=True):
        net.to(device).eval()
        pad = isinstance(net, HTDemucs) and bool(getattr(net, "use_train_segment", True))
        valid = getattr(net, "valid_length", None)
        members.append(Member(
            forward=net,
            segment_length=int(model.samplerate * float(net.segment)),
            valid_length=valid if (valid is not None and not pad) else (lambda n: n),
            weights=[float(w) for w in net_weights],
            module=net,
            pad_to_segment=pad,
        ))
    return LoadedModel(
        name=name,
        sources=list(model.sources),
        samplerate=int(model.samplerate),
        audio_channels=int(model.audio_channels),
        members=members,
        device=device,
    )

