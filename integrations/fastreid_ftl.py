"""fastreid adapter for FTL (Yin et al. 2019): the ``FTLBaseline`` meta-architecture, the
``FTLHook`` that runs Algorithm 1 inside fastreid's trainer, and ``FTLTrainer``.

Importing this module applies fastreid's compatibility patches (see
:func:`feature_cloud.integrations.fastreid.patch_fastreid_compat`) and registers
``FTLBaseline`` in ``fastreid.modeling.meta_arch.META_ARCH_REGISTRY``. A training script::

    from feature_cloud.integrations.fastreid_ftl import FTLTrainer, add_ftl_config
    cfg = get_cfg()
    add_ftl_config(cfg)                        # adds MODEL.FTL
    cfg.merge_from_file(config_path("Market1501/ftl_R50.yml"))  # feature_cloud.integrations.fastreid
    trainer = FTLTrainer(cfg)                  # DefaultTrainer + FTLHook
    trainer.resume_or_load(resume=False)
    trainer.train()

How FTL's Fig. 2 maps onto fastreid (the adapter only wires; every equation is the core's):

* ``Enc`` = fastreid backbone (``MODEL.BACKBONE``) + fastreid pooling (``MODEL.HEADS.POOL_LAYER``):
  the rich feature ``g`` (``MODEL.BACKBONE.FEAT_DIM``);
* ``Dec`` = :class:`feature_cloud.ftl.ConvDecoder` to the normalised training image
  (``MODEL.FTL.DECODER_CHANNELS``; empty: no reconstruction, ``ALPHA_RECON`` must be 0);
* ``R`` = :func:`feature_cloud.ftl.make_filter` (``g -> f``, ``MODEL.HEADS.EMBEDDING_DIM``);
* ``FC`` = ``nn.Linear`` (``MODEL.HEADS.CLS_LAYER: Linear``, the paper's softmax) or a
  :class:`feature_cloud.LEAPMarginHead` without cloud (``CosSoftmax`` / ``ArcSoftmax``);
* the loss is :meth:`FTLModel.loss` (Eq. 4) on fastreid's training batches (stages 0 and 2) and
  :meth:`FTLModel.feature_loss` on the three stage-1 batches that :class:`FTLHook` builds with
  :meth:`AlternatingScheduler.stage1_batches`; fastreid's ``MODEL.LOSSES`` are not used.
  Inference returns ``f = R(g)``.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from feature_cloud.checkpoints import CheckedBeforeLoading
from feature_cloud.ftl import (
    DEFAULT_TAIL_SAMPLING,
    FILTERS,
    TAIL_SAMPLING,
    AlternatingScheduler,
    ConvDecoder,
    FTLModel,
    StreamSampler,
    _SeededItems,  # each item's augmentation seeded from its stream position (as loaders())
    _SeededPositions,
    check_tail_split,
    make_filter,
)
from feature_cloud.functional import DEFAULT_RECON_REDUCTION, RECON_REDUCTIONS
from feature_cloud.heads import LEAPMarginHead
from feature_cloud.integrations.fastreid import (  # noqa: F401
    _YAML_KEYS,
    CLS_LAYER_TO_MARGIN,
    _add_missing_node,
    _register_once,
    _warn_fastreid_margin_defaults,
    _yaml_warnings,
    add_feature_cloud_config,
    class_counts_from_dataset,
    config_path,
    margin_for_cls_layer,
    patch_fastreid_compat,
)
from feature_cloud.transfer import FeatureTransfer

patch_fastreid_compat()

from fastreid.config import CfgNode, configurable, get_cfg  # noqa: E402
from fastreid.data.build import fast_batch_collator  # noqa: E402
from fastreid.data.transforms import build_transforms  # noqa: E402
from fastreid.engine import DefaultTrainer, hooks  # noqa: E402
from fastreid.engine.train_loop import HookBase  # noqa: E402
from fastreid.layers import pooling  # noqa: E402
from fastreid.modeling.backbones import build_backbone  # noqa: E402
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY  # noqa: E402
from fastreid.solver import build as solver_build  # noqa: E402
from fastreid.utils import comm  # noqa: E402

__all__ = ["add_ftl_config", "FTLEncoder", "FTLBaseline", "FTLHook", "FTLTrainer"]

logger = logging.getLogger("fastreid.feature_cloud.ftl")  # under "fastreid": shown in its log


# ------------------------------------------------------------------ configuration
def add_ftl_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.FTL`` node (defaults: FTL paper, Sec. 3-4).

    Schedule (Algorithm 1, in trainer iterations): ``STAGE0_ITERS`` (stage 0, all modules),
    ``STAGE_ITERS`` (each stage 1, and each stage 2 unless ``STAGE2_ITERS`` > 0; paper 5000 both),
    ``MAX_ALTERNATIONS`` ((stage 1, stage 2) pairs; 0: until the trainer stops). Loss (Eq. 4):
    ``ALPHA_SFMX``, ``ALPHA_RECON``, ``ALPHA_REG`` (paper 1, 1, 0.25), ``RECON_REDUCTION``
    (``mean``, the default: Eq. 1 per pixel, the paper's divided by ``3 * H * W``; ``paper``:
    Eq. 1 summed over each image, the paper's balance of Eq. 4 with ``ALPHA_RECON: 1``:
    :class:`~feature_cloud.FTLModel`'s ``recon_reduction``). Modules:
    ``FILTER`` (``R``'s form: ``"mlp"``, the paper's role, or ``"residual"``, ``f = g + R(g)``
    starting at ``f = g``, needs ``EMBEDDING_DIM`` = the backbone's feature size:
    :func:`~feature_cloud.ftl.make_filter`), ``FILTER_HIDDEN`` (hidden width of ``R``; 0: twice
    the embedding size), ``DECODER_CHANNELS``
    (``Dec`` upsampling stages; empty: no decoder).
    UpdateStats: ``ENERGY`` (PCA energy kept, paper 0.95) or ``NUM_COMPONENTS`` (> 0 wins),
    ``TAIL_THRESHOLD`` (a class with <= T training images is long-tail, paper 20), ``FLIP``
    (flipped-image centers of Eq. 5), ``STATS_BATCH_SIZE`` (0: ``TEST.IMS_PER_BATCH``).
    Stage 1: ``STAGE1_BATCH_SIZE`` of the hard and of the long-tail batch (0:
    ``SOLVER.IMS_PER_BATCH``), ``TAIL_SAMPLING`` (how the long-tail batch is drawn:
    ``"samples"``, uniform over the long-tail images, or ``"classes"``, every long-tail class
    equally often: :class:`AlternatingScheduler`'s ``tail_sampling``). ``SEED``: the stage-1
    samplers' seed, and their items' augmentation draws' (:meth:`FTLHook._stage1_loader`).
    String values (``RECON_REDUCTION``, ``FILTER``, ``TAIL_SAMPLING``) are read in any case,
    as ``MODEL.HEADS.FEATURE_CLOUD``'s. Called again on a config that has the node, it adds only
    the missing keys (values already set stay).
    """
    node = CfgNode()
    node.STAGE0_ITERS = 5000
    node.STAGE_ITERS = 5000
    node.STAGE2_ITERS = 0
    node.MAX_ALTERNATIONS = 0
    node.ALPHA_SFMX = 1.0
    node.ALPHA_RECON = 1.0
    node.ALPHA_REG = 0.25
    node.RECON_REDUCTION = DEFAULT_RECON_REDUCTION
    node.FILTER = "mlp"
    node.FILTER_HIDDEN = 0
    node.DECODER_CHANNELS = [256, 192, 128, 64]
    node.ENERGY = 0.95
    node.NUM_COMPONENTS = 0
    node.TAIL_THRESHOLD = 20
    node.FLIP = True
    node.STATS_BATCH_SIZE = 0
    node.STAGE1_BATCH_SIZE = 0
    node.TAIL_SAMPLING = DEFAULT_TAIL_SAMPLING
    node.SEED = 0
    return _add_missing_node(cfg, ("MODEL", "FTL"), node)


def _ftl_node(cfg: CfgNode) -> CfgNode:
    if "FTL" not in cfg.MODEL:
        raise KeyError(
            "MODEL.FTL is missing: call feature_cloud.integrations.fastreid_ftl.add_ftl_config(cfg) "
            "before cfg.merge_from_file(...)"
        )
    return cfg.MODEL.FTL


# ------------------------------------------------------------------ the model
class FTLEncoder(nn.Module):
    """FTL's ``Enc`` for fastreid: backbone feature map -> fastreid pooling -> ``g`` ``(B, D)``.

    ``backbone``: fastreid's backbone (a feature map); ``pool``: fastreid's pooling layer
    (``MODEL.HEADS.POOL_LAYER``)."""

    def __init__(self, backbone: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.backbone(x)).flatten(1)


#: ``FTLModel`` / margin-head argument -> the YAML key (warnings name the key)
_FTL_YAML_KEYS = {
    **_YAML_KEYS,
    "alpha_sfmx": "MODEL.FTL.ALPHA_SFMX",
    "alpha_recon": "MODEL.FTL.ALPHA_RECON",
    "alpha_reg": "MODEL.FTL.ALPHA_REG",
    "recon_reduction": "MODEL.FTL.RECON_REDUCTION",
}

#: ``MODEL.HEADS`` keys that FTLBaseline reads (``SCALE`` / ``MARGIN`` with a margin ``CLS_LAYER``)
_FTL_HEADS_KEYS = ("NUM_CLASSES", "EMBEDDING_DIM", "POOL_LAYER", "CLS_LAYER")


def _unused_fastreid_keys(cfg: CfgNode) -> List[str]:
    """``KEY: value`` of the ``MODEL.HEADS`` / ``MODEL.LOSSES`` keys that differ from fastreid's
    defaults (``get_cfg()``, with :func:`add_feature_cloud_config`'s node) and that FTLBaseline
    does not read: fastreid's head and losses (``NAME``, ``NECK_FEAT``, ``WITH_BNNECK``, ``NORM``,
    every ``LOSSES`` key; ``SCALE`` and ``MARGIN`` with ``CLS_LAYER: Linear``) and LEAPHead's
    ``FEATURE_CLOUD`` node (FTL's ``FC`` has no cloud). FTL's loss is Eq. 4
    (``MODEL.FTL.ALPHA_*``)."""
    used = set(_FTL_HEADS_KEYS)
    if cfg.MODEL.HEADS.CLS_LAYER != "Linear":
        used |= {"SCALE", "MARGIN"}
    defaults = add_feature_cloud_config(get_cfg()).MODEL

    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    def walk(node: CfgNode, default: CfgNode, path: str, skip: Sequence[str]) -> Iterator[str]:
        for key, value in default.items():
            if key in skip or key not in node:
                continue
            if isinstance(value, CfgNode):
                yield from walk(node[key], value, f"{path}.{key}", ())
            elif norm(node[key]) != norm(value):
                yield f"{path}.{key}: {node[key]!r}"

    return [
        *walk(cfg.MODEL.HEADS, defaults.HEADS, "MODEL.HEADS", list(used)),
        *walk(cfg.MODEL.LOSSES, defaults.LOSSES, "MODEL.LOSSES", ()),
    ]


def _recon_reduction(ftl_cfg: CfgNode) -> str:
    """``MODEL.FTL.RECON_REDUCTION`` (``mean`` in configurations written before the key), in any
    case (``PAPER``), as every string value of the ``MODEL.FTL`` and ``FEATURE_CLOUD`` nodes
    (the Python keywords of ``FTLModel`` and timm take the lower-case names only)."""
    reduction = str(ftl_cfg.get("RECON_REDUCTION", DEFAULT_RECON_REDUCTION)).lower()
    if reduction not in RECON_REDUCTIONS:
        raise ValueError(
            f"MODEL.FTL.RECON_REDUCTION must be one of {RECON_REDUCTIONS} (mean: Eq. 1 per pixel, "
            f"the default; paper: per image, as printed), got {ftl_cfg.RECON_REDUCTION!r}"
        )
    return reduction


def _filter(ftl_cfg: CfgNode, feat_dim: int, emb_dim: int, hidden: int) -> nn.Module:
    """``R`` of ``MODEL.FTL.FILTER`` (``mlp`` in configurations written before the key; any
    case, as the node's other string values)."""
    form = str(ftl_cfg.get("FILTER", "mlp")).lower()
    if form not in FILTERS:
        raise ValueError(f"MODEL.FTL.FILTER must be one of {FILTERS}, got {ftl_cfg.FILTER!r}")
    if form == "residual" and emb_dim != feat_dim:
        raise ValueError(
            f"MODEL.FTL.FILTER: residual maps g to f of the same size: MODEL.HEADS.EMBEDDING_DIM "
            f"({emb_dim}) must be the backbone's feature size MODEL.BACKBONE.FEAT_DIM "
            f"({feat_dim}), or 0"
        )
    return make_filter(feat_dim, emb_dim, hidden, form=form)


@_register_once(META_ARCH_REGISTRY)
class FTLBaseline(CheckedBeforeLoading, nn.Module):
    """fastreid meta-architecture holding an :class:`~feature_cloud.FTLModel` (FTL Fig. 2).

    ``forward(batched_inputs)`` in training returns ``{"loss_ftl": L}``: Eq. 4
    (:meth:`FTLModel.loss`) on a fastreid batch, or, for the stage-1 batches that
    :class:`FTLHook` feeds (``{"ftl_features": g, "targets": y}``), the ``R``/``FC`` loss of
    Eq. 2-3 on those rich features (:meth:`FTLModel.feature_loss`). In eval mode it returns the
    identity feature ``f = R(Enc(x))`` for fastreid's evaluator.

    Built from the YAML (``META_ARCHITECTURE: FTLBaseline``) or from Python with ``ftl`` (the
    :class:`~feature_cloud.FTLModel`), ``pixel_mean`` / ``pixel_std`` (per channel, as
    fastreid's ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``: images are normalised with them) and
    ``inference_only`` (``MODEL.HEADS.NUM_CLASSES: 0``: ``f`` only, no training).
    """

    @configurable
    def __init__(
        self,
        *,
        ftl: FTLModel,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        inference_only: bool = False,
    ) -> None:
        super().__init__()
        #: built with ``MODEL.HEADS.NUM_CLASSES: 0``: ``f = R(Enc(x))`` only, no training
        self.inference_only = bool(inference_only)
        if not isinstance(ftl, FTLModel):
            raise TypeError(f"ftl must be a feature_cloud.FTLModel, got {type(ftl).__name__}")
        self.ftl = ftl
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False
        )

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        ftl_cfg = _ftl_node(cfg)
        heads = cfg.MODEL.HEADS
        num_classes = int(heads.NUM_CLASSES)
        if num_classes < 0:
            raise ValueError(f"MODEL.HEADS.NUM_CLASSES must be >= 0, got {num_classes}")
        # NUM_CLASSES 0 (the shipped YAMLs; DefaultTrainer fills it from the training set): an
        # inference-only model, Enc + R load from a checkpoint, the one-class FC is a placeholder
        inference_only = num_classes == 0
        num_classes = max(num_classes, 1)
        if not hasattr(pooling, heads.POOL_LAYER):
            raise ValueError(
                f"unknown MODEL.HEADS.POOL_LAYER {heads.POOL_LAYER!r}; expected one of {pooling.__all__}"
            )
        with _yaml_warnings(_FTL_YAML_KEYS):  # fastreid's log names the YAML keys
            unused = _unused_fastreid_keys(cfg)
            if unused:
                cloud = any(k.startswith("MODEL.HEADS.FEATURE_CLOUD.") for k in unused)
                warnings.warn(
                    "FTLBaseline does not use these fastreid keys, set to other than fastreid's "
                    f"defaults: {', '.join(unused)}. FTL's loss is Eq. 4 (MODEL.FTL.ALPHA_SFMX, "
                    "ALPHA_RECON, ALPHA_REG), its head R and FC (MODEL.HEADS.EMBEDDING_DIM, "
                    "CLS_LAYER; SCALE and MARGIN with CosSoftmax / ArcSoftmax)"
                    + (
                        "; its FC has no feature cloud (MODEL.HEADS.FEATURE_CLOUD is LEAPHead's; "
                        "FTL with a LEAP FC: timm's FTLTask, or the core FTLModel)"
                        if cloud
                        else ""
                    ),
                    stacklevel=2,  # re-emitted by _yaml_warnings
                )
            _warn_fastreid_margin_defaults(cfg, "FTLBaseline")  # a margin FC at SCALE 1
            return cls._build(cfg, ftl_cfg, num_classes, inference_only)

    @classmethod
    def _build(
        cls, cfg: CfgNode, ftl_cfg: CfgNode, num_classes: int, inference_only: bool
    ) -> Dict[str, Any]:
        heads = cfg.MODEL.HEADS
        feat_dim = int(cfg.MODEL.BACKBONE.FEAT_DIM)
        emb_dim = int(heads.EMBEDDING_DIM) or feat_dim
        encoder = FTLEncoder(build_backbone(cfg), getattr(pooling, heads.POOL_LAYER)())
        if heads.CLS_LAYER == "Linear":
            classifier: nn.Module = nn.Linear(emb_dim, num_classes, bias=False)
        else:
            classifier = LEAPMarginHead(
                emb_dim,
                num_classes,
                margin_type=margin_for_cls_layer(heads.CLS_LAYER, "FTLBaseline", ["Linear"]),
                scale=float(heads.SCALE),
                margin=float(heads.MARGIN),
                cloud=None,
            )
        channels = [int(c) for c in ftl_cfg.DECODER_CHANNELS]
        decoder = None
        if channels:
            decoder = ConvDecoder(
                feat_dim, out_shape=(3, *[int(v) for v in cfg.INPUT.SIZE_TRAIN]), channels=channels
            )
        hidden = int(ftl_cfg.FILTER_HIDDEN) or 2 * emb_dim
        k = int(ftl_cfg.NUM_COMPONENTS)
        transfer = FeatureTransfer(
            feat_dim,
            num_classes,
            num_components=k if k > 0 else None,
            energy=None if k > 0 else float(ftl_cfg.ENERGY),
            tail_threshold=int(ftl_cfg.TAIL_THRESHOLD),
        )
        ftl = FTLModel(
            encoder,
            classifier,
            feature_dim=feat_dim,
            filter_net=_filter(ftl_cfg, feat_dim, emb_dim, hidden),
            decoder=decoder,
            alpha_sfmx=float(ftl_cfg.ALPHA_SFMX),
            alpha_recon=float(ftl_cfg.ALPHA_RECON),
            alpha_reg=float(ftl_cfg.ALPHA_REG),
            recon_reduction=_recon_reduction(ftl_cfg),
            transfer=transfer,
        )
        return {
            "ftl": ftl,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "inference_only": inference_only,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def backbone(self) -> nn.Module:
        """The fastreid backbone inside ``Enc``."""
        return self.ftl.encoder.backbone

    def preprocess_image(self, batched_inputs: Any) -> Tensor:
        """fastreid's normalisation, ``(x - PIXEL_MEAN) / PIXEL_STD``, on the model's device and in
        its dtype (the buffers' dtype: float32, or half / bfloat16 after ``.half()`` /
        ``.to(torch.bfloat16)``, as fastreid's own ``Baseline``); uint8 images are accepted."""
        images = batched_inputs["images"] if isinstance(batched_inputs, dict) else batched_inputs
        if not isinstance(images, Tensor):
            raise TypeError(
                f"batched_inputs must be a dict with 'images' or a tensor, got {type(batched_inputs).__name__}"
            )
        mean = self.pixel_mean
        return (images.to(mean.device, mean.dtype) - mean) / self.pixel_std

    def forward(self, batched_inputs: Dict[str, Any]) -> Any:
        if not self.training:
            return self.ftl(self.preprocess_image(batched_inputs))
        if self.inference_only:
            raise RuntimeError(
                "FTLBaseline was built with MODEL.HEADS.NUM_CLASSES: 0 (inference only); fastreid's "
                "DefaultTrainer sets NUM_CLASSES from the training set, set it in the config to train"
            )
        if "targets" not in batched_inputs:
            raise ValueError("FTLBaseline needs 'targets' (identity labels) in training mode")
        targets = batched_inputs["targets"].to(self.device)
        if "ftl_features" in batched_inputs:  # stage 1 of Algorithm 1, fed by FTLHook
            out = self.ftl.feature_loss(batched_inputs["ftl_features"], targets)
        else:
            out = self.ftl.loss(self.preprocess_image(batched_inputs), targets)
        return {"loss_ftl": out["loss"]}


# ------------------------------------------------------------------ data plumbing
class _WithIndex(Dataset):
    """A fastreid dataset whose items also carry their dataset ``index`` (for the hard list)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = dict(self.dataset[index])
        item["index"] = index
        return item


class _Batches:
    """Re-iterable view of a fastreid ``DataLoader`` as ``(normalised images, targets, index)``
    tuples, the batch format of :class:`AlternatingScheduler`."""

    def __init__(self, loader: DataLoader, preprocess: Callable[[Any], Tensor]) -> None:
        self.loader = loader
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        for batch in self.loader:
            yield self.preprocess(batch), batch["targets"], batch["index"]


class _Stage1Stream:
    """The trainer's data source during stage 1: each item is the three stage-1 batches of
    Algorithm 1 (hard regular batch from ``h``, long-tail batch, transferred batch, Eq. 6) as
    rich features, from :meth:`AlternatingScheduler.stage1_batches` (``Enc`` is fixed in stage 1,
    so ``g`` is data here)."""

    def __init__(self, scheduler: AlternatingScheduler, hard: _Batches, tail: _Batches) -> None:
        self.scheduler = scheduler
        self._pairs = zip(hard, tail)

    def __iter__(self) -> _Stage1Stream:
        return self

    def __next__(self) -> Dict[str, Tensor]:
        hard, tail = next(self._pairs)
        (gr, yr), (gt, yt), (gx, yx) = self.scheduler.stage1_batches(hard, tail)
        return {
            "ftl_features": torch.cat([gr, gt.to(gr.dtype), gx.to(gr.dtype)]),
            "targets": torch.cat([yr, yt, yx]),
        }


def _check_tail_split(
    ftl: FTLModel, train_set: Dataset, datasets: Optional[Sequence[str]] = None
) -> None:
    """Refuse a training set of another class count than ``MODEL.HEADS.NUM_CLASSES``, or without
    long-tail or without regular classes (:func:`feature_cloud.ftl.check_tail_split`), before
    anything trains; with ``datasets``
    (``DATASETS.NAMES``) the message names ``MODEL.FTL.TAIL_THRESHOLD``. A dataset that is not
    fastreid's ``CommDataset`` is left to UpdateStats, which checks the same after its first pass."""
    try:
        counts = class_counts_from_dataset(train_set)
    except TypeError:
        return
    if counts.numel() != ftl.num_classes:  # LEAPHead's message (FeatureTransfer's names its args)
        names = "" if datasets is None else f" (DATASETS.NAMES {tuple(datasets)})"
        raise ValueError(
            f"the training set{names} has {counts.numel()} identities but "
            f"MODEL.HEADS.NUM_CLASSES is {ftl.num_classes} (leave it 0: fastreid's trainer sets "
            "it from the data)"
        )
    try:
        check_tail_split(ftl.feature_transfer, counts)
    except ValueError as error:
        if datasets is None:
            raise
        raise ValueError(
            str(error).replace("tail_threshold", "MODEL.FTL.TAIL_THRESHOLD")
            + f" (training set: DATASETS.NAMES {tuple(datasets)})"
        ) from error


#: :class:`AlternatingScheduler`'s schedule settings -> their ``MODEL.FTL`` keys
_SCHEDULE_KEYS = {
    "stage0_iters": "MODEL.FTL.STAGE0_ITERS",
    "stage_iters": "MODEL.FTL.STAGE_ITERS",
    "stage2_iters": "MODEL.FTL.STAGE2_ITERS",
    "seed": "MODEL.FTL.SEED",
    "tail_sampling": "MODEL.FTL.TAIL_SAMPLING",
}
#: :meth:`AlternatingScheduler.check_state_dict`'s refusal of another schedule setting
_SCHEDULE_REFUSAL = re.compile(
    r"checkpoint has (\w+)=(.*?) but this scheduler has (.*?)( \(.*\))?", re.DOTALL
)


def _schedule_refusal(error: ValueError) -> ValueError:
    """The core's refusal of a checkpoint of another schedule (``checkpoint has stage_iters=10
    but this scheduler has 12``) in the fastreid user's terms: the ``MODEL.FTL`` key and the way
    out. Any other error is returned as it is."""
    match = _SCHEDULE_REFUSAL.fullmatch(str(error))
    if match is None or match.group(1) not in _SCHEDULE_KEYS:
        return error
    name, saved, own, why = match.groups()
    key = _SCHEDULE_KEYS[name]
    notes = [why.strip()[1:-1].replace(name, key)] if why else []
    if name == "stage2_iters":  # the scheduler's value; the YAML's 0 means STAGE_ITERS
        notes.append(f"each stage 2's length; {key} 0 is MODEL.FTL.STAGE_ITERS")
    note = f" ({'; '.join(notes)})" if notes else ""
    return ValueError(
        f"cannot resume: the checkpoint's FTL schedule has {key} {saved} but this config has "
        f"{own}{note}; set {key} to the checkpoint's {saved} to resume, or start from its weights "
        "with resume=False (MODEL.WEIGHTS, without --resume: the FTL schedule starts afresh)"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


# ------------------------------------------------------------------ the hook
class FTLHook(HookBase):
    """Runs FTL's Algorithm 1 inside fastreid's trainer by driving an
    :class:`~feature_cloud.AlternatingScheduler`.

    * **Stage switches**: :meth:`after_step` counts the iteration (:meth:`AlternatingScheduler.step`),
      which freezes the stage's fixed parts (``requires_grad=False``, ``.grad=None``, eval mode).
      The optimizer must hold the parameters themselves (``build_optimizer(cfg, model,
      contiguous=False)``, as :class:`FTLTrainer` does): then ``torch.optim`` skips a frozen
      parameter entirely — no weight decay, no momentum step. fastreid's default flat
      ``ContiguousParams`` buffers would keep moving them, so they are refused.
    * **UpdateStats** on entering stage 1: :meth:`AlternatingScheduler.update_stats` over the
      whole training set (the trainer's dataset with the deterministic test transform at the
      training size, ``Enc`` in eval mode, optional flipped views for Eq. 5).
    * **Stage 1 batches**: while stage 1 runs, the trainer's data iterator is swapped for a stream
      of hard + long-tail + transferred feature batches (the scheduler's resumable samplers over
      the trainer's dataset with its training transform, each item's random augmentation drawn
      from a seed of its position in the stream, so that a resume mid stage 1 is bit for bit
      (on a GPU host with workers: fastreid's GPU ``DataLoaderX`` draws from the same RNGs in a
      thread of the main process; README): :meth:`_stage1_loader`); the trainer's own ``run_step``
      (forward, backward, optimizer step, metrics) is unchanged. Stages 0 and 2 use the trainer's
      own data loader.
    * **Regular and long-tail classes**: a training set without either (every class above, or
      every class at or below, ``TAIL_THRESHOLD`` images) is refused when the hook is built
      (:func:`feature_cloud.ftl.check_tail_split`), before anything trains.
    * **Checkpoint**: registered in the trainer's ``Checkpointer`` as ``"ftl_scheduler"``:
      the scheduler state and the :class:`FeatureTransfer` statistics (``C``, ``Q``, ``h``; the
      model's state holds them too, which fastreid's unpatched checkpointer skips: their size
      depends on the data). Loading it is all or nothing: a checkpoint of another schedule
      (stage lengths, seed, ``TAIL_SAMPLING``) is refused before the trainer changes (the
      adapter's ``Checkpointer`` asks :meth:`check_state_dict` before it loads the model); a
      fine-tune from ``MODEL.WEIGHTS`` loads the weights only and is not checked.

    Args:
        model: the (possibly DDP-wrapped) :class:`FTLBaseline`.
        train_set: the training dataset of fastreid dicts (``trainer.data_loader.dataset``).
        stats_transform: deterministic transform for UpdateStats.
        stage0_iters, stage_iters, stage2_iters, max_alternations, seed, tail_sampling:
            :class:`AlternatingScheduler`'s.
        flip: use horizontally flipped images for the centers (Eq. 5).
        quality: Eq. 5's quality filter Omega, ``(x, g) -> (B,) bool`` over the
            preprocessed images and their rich features (paper: yaw below ``tau``); ``None``:
            every image (:class:`AlternatingScheduler`'s ``quality``).
        stats_batch_size, stage1_batch_size, num_workers: the hook's data loaders.
        optimizer: checked to hold the model's parameters themselves.
        checkpointer: registers ``"ftl_scheduler"`` in it.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        *,
        stats_transform: Optional[Callable[[Any], Any]] = None,
        stage0_iters: int,
        stage_iters: int,
        stage2_iters: Optional[int] = None,
        max_alternations: Optional[int] = None,
        seed: int = 0,
        tail_sampling: str = DEFAULT_TAIL_SAMPLING,
        flip: bool = True,
        quality: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        stats_batch_size: int = 64,
        stage1_batch_size: int = 64,
        num_workers: int = 0,
        optimizer: Optional[torch.optim.Optimizer] = None,
        checkpointer: Optional[Any] = None,
    ) -> None:
        meta = _unwrap(model)
        if not isinstance(meta, FTLBaseline):
            raise TypeError(
                f"FTLHook needs the FTLBaseline meta-architecture (MODEL.META_ARCHITECTURE: FTLBaseline), got {type(meta).__name__}"
            )
        if comm.get_world_size() > 1:
            raise NotImplementedError(
                "FTLHook runs single-process: fastreid's DDP wrapper has no "
                "find_unused_parameters for frozen stages and the hook's data-parallel path is "
                "untested; the core AlternatingScheduler runs data parallel (README, 'FTL: Usage')"
            )
        if int(stats_batch_size) < 1 or int(stage1_batch_size) < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got {stats_batch_size}, {stage1_batch_size}"
            )
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [
                n for n, p in meta.ftl.named_parameters() if p.requires_grad and id(p) not in held
            ]
            if missing:
                raise ValueError(
                    "the optimizer does not hold the model's parameters themselves (e.g. fastreid's "
                    "contiguous buffers): frozen FTL parts would still move by weight decay and momentum. "
                    "Build it with fastreid.solver.build_optimizer(cfg, model, contiguous=False) (FTLTrainer "
                    f"does); missing e.g. {missing[0]}"
                )
        _check_tail_split(meta.ftl, train_set)
        self.meta = meta
        self.ftl: FTLModel = meta.ftl
        self.scheduler = AlternatingScheduler(
            self.ftl,
            stage0_iters=stage0_iters,
            stage_iters=stage_iters,
            stage2_iters=stage2_iters,
            max_alternations=max_alternations,
            seed=seed,
            flip=(lambda x: x.flip(-1)) if flip else None,
            quality=quality,
            tail_sampling=tail_sampling,
        )
        self.train_set = _WithIndex(train_set)
        stats_set = copy.copy(train_set)
        if stats_transform is not None:
            if not hasattr(stats_set, "transform"):
                raise TypeError(
                    "stats_transform needs a dataset with a .transform attribute (fastreid's CommDataset)"
                )
            stats_set.transform = stats_transform
        loader_kw = dict(num_workers=int(num_workers), collate_fn=fast_batch_collator)
        self.stats_batches = _Batches(
            DataLoader(
                _WithIndex(stats_set), batch_size=int(stats_batch_size), shuffle=False, **loader_kw
            ),
            meta.preprocess_image,
        )
        self.stage1_batch_size = int(stage1_batch_size)
        self._loader_kw = loader_kw
        self._stage1: Optional[_Stage1Stream] = None
        self._saved_iter: Optional[Any] = None
        self.last_update: Optional[Dict[str, Any]] = None
        if checkpointer is not None:
            checkpointer.checkpointables["ftl_scheduler"] = self

    @classmethod
    def from_trainer(
        cls,
        trainer: DefaultTrainer,
        cfg: Optional[CfgNode] = None,
        quality: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    ) -> FTLHook:
        """Build the hook from a constructed ``DefaultTrainer`` and ``MODEL.FTL`` (see
        :func:`add_ftl_config`); registers it in the trainer's checkpointer. Register the hook
        with ``trainer.register_hooks([...])`` before ``resume_or_load`` / ``train``.
        ``quality``: Eq. 5's filter (a function, so not a YAML key; :class:`FTLTrainer` takes it
        from :meth:`FTLTrainer.build_ftl_quality`)."""
        cfg = trainer.cfg if cfg is None else cfg
        meta = _unwrap(trainer.model)
        if isinstance(meta, FTLBaseline):  # else __init__ names the meta-architecture
            _check_tail_split(meta.ftl, trainer.data_loader.dataset, cfg.DATASETS.NAMES)
        ftl_cfg = _ftl_node(cfg)
        stats_cfg = cfg.clone()
        stats_cfg.defrost()
        stats_cfg.INPUT.SIZE_TEST = cfg.INPUT.SIZE_TRAIN  # statistics of the training-size g
        alternations = int(ftl_cfg.MAX_ALTERNATIONS)
        tail_sampling = str(ftl_cfg.get("TAIL_SAMPLING", DEFAULT_TAIL_SAMPLING)).lower()
        if tail_sampling not in TAIL_SAMPLING:  # any case, as the node's other string values
            raise ValueError(
                f"MODEL.FTL.TAIL_SAMPLING must be one of {TAIL_SAMPLING}, got "
                f"{ftl_cfg.TAIL_SAMPLING!r}"
            )
        return cls(
            trainer.model,
            trainer.data_loader.dataset,
            stats_transform=build_transforms(stats_cfg, is_train=False),
            stage0_iters=int(ftl_cfg.STAGE0_ITERS),
            stage_iters=int(ftl_cfg.STAGE_ITERS),
            stage2_iters=int(ftl_cfg.STAGE2_ITERS) or None,
            max_alternations=alternations if alternations > 0 else None,
            seed=int(ftl_cfg.SEED),
            tail_sampling=tail_sampling,
            flip=bool(ftl_cfg.FLIP),
            quality=quality,
            stats_batch_size=int(ftl_cfg.STATS_BATCH_SIZE) or int(cfg.TEST.IMS_PER_BATCH),
            stage1_batch_size=int(ftl_cfg.STAGE1_BATCH_SIZE) or int(cfg.SOLVER.IMS_PER_BATCH),
            num_workers=int(cfg.DATALOADER.NUM_WORKERS),
            optimizer=trainer.optimizer,
            checkpointer=trainer.checkpointer,
        )

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """``{"scheduler": ..., "feature_transfer": ...}`` (Algorithm 1 position, ``C``/``Q``/``h``)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "feature_transfer": self.ftl.feature_transfer.state_dict(),
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise if :meth:`load_state_dict` would refuse the schedule of ``state``; changes
        nothing. The adapter's ``Checkpointer`` calls it before it loads the model, so a
        checkpoint of another schedule leaves the whole trainer as it was. A schedule setting
        that differs is named by its ``MODEL.FTL`` key, with the way out."""
        missing = {"scheduler", "feature_transfer"} - set(state)
        if missing:
            raise ValueError(f"FTL hook state lacks {sorted(missing)}")
        try:
            self.scheduler.check_state_dict(state["scheduler"])
        except ValueError as error:  # the MODEL.FTL key, not the core's argument
            translated = _schedule_refusal(error)
            if translated is error:
                raise
            raise translated from error

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the scheduler (and the transfer statistics) from :meth:`state_dict`'s
        ``state``, all or nothing: checked first (:meth:`check_state_dict`)."""
        self.check_state_dict(state)
        with self.scheduler.restoring(self.ftl.feature_transfer):  # all or nothing
            self.scheduler.load_state_dict(state["scheduler"])  # checks the settings first
            self.ftl.feature_transfer.load_state_dict(state["feature_transfer"])
        self._leave_stage1()

    # ------------------------------------------------------------------ hook methods
    def before_train(self) -> None:
        sched = self.scheduler
        if sched.iteration != self.trainer.iter:
            logger.warning(
                "FTL schedule at iteration %d but the trainer starts at %d (checkpoint without "
                "'ftl_scheduler'?): the stages count from the schedule's own position",
                sched.iteration,
                self.trainer.iter,
            )
        total = sched.total_iters
        if total is not None:
            left = total - sched.iteration
            if self.trainer.max_iter - self.trainer.iter > left:
                raise ValueError(
                    f"the FTL schedule ends after {total} iterations but the trainer runs to "
                    f"{self.trainer.max_iter}: set MODEL.FTL.MAX_ALTERNATIONS to 0 (until the trainer "
                    "stops) or shorten SOLVER.MAX_EPOCH"
                )
        self._sync()

    def after_step(self) -> None:
        sched = self.scheduler
        if sched.finished:
            return
        self.trainer.storage.put_scalar("ftl_stage", sched.stage, smoothing_hint=False)
        sched.step()
        if self.trainer.iter + 1 < self.trainer.max_iter:
            self._sync()
        else:  # no step left: a stage 1 starting now gets its UpdateStats on resume (before_train)
            self._leave_stage1()

    def after_train(self) -> None:
        self._leave_stage1()

    # ------------------------------------------------------------------ stage plumbing
    def _inner_trainer(self) -> Any:
        return getattr(self.trainer, "_trainer", self.trainer)

    def _sync(self) -> None:
        """Bring the data source and statistics in line with the scheduler's stage."""
        sched = self.scheduler
        if sched.stage != 1 or sched.finished:
            self._leave_stage1()
            return
        if sched.needs_stats:
            self._leave_stage1()
            self.last_update = sched.update_stats(self.stats_batches)
            logger.info("FTL UpdateStats at iteration %d: %s", sched.iteration, self.last_update)
        if self._stage1 is None:
            b = self.stage1_batch_size
            hard = self._stage1_loader(sched.hard_sampler(b))
            tail = self._stage1_loader(sched.tail_sampler(b))
            preprocess = self.meta.preprocess_image
            self._stage1 = _Stage1Stream(
                sched, _Batches(hard, preprocess), _Batches(tail, preprocess)
            )
            inner = self._inner_trainer() if getattr(self, "trainer", None) is not None else None
            if inner is not None:
                self._saved_iter = inner._data_loader_iter
                inner._data_loader_iter = self._stage1

    def _stage1_loader(self, sampler: StreamSampler) -> DataLoader:
        """A stage-1 loader: the scheduler's resumable ``sampler`` over the training set with
        its training transform, each item's random augmentation drawn from the seed of its
        position in the stream (:class:`_SeededPositions`), so a run resumed mid-stage draws what
        the uninterrupted run drew, with or without workers (on a GPU host, with workers only:
        fastreid's ``DataLoaderX`` prefetches in a main-process thread drawing from the same
        RNGs). Its own generator (the workers' base seed): iterating it leaves torch's global
        RNG alone."""
        return DataLoader(
            _SeededItems(self.train_set),
            batch_size=self.stage1_batch_size,
            sampler=_SeededPositions(sampler),
            drop_last=True,
            generator=torch.Generator().manual_seed(sampler.seed),
            **self._loader_kw,
        )

    def _leave_stage1(self) -> None:
        if self._stage1 is None:
            return
        if self._saved_iter is not None:
            self._inner_trainer()._data_loader_iter = self._saved_iter
        self._stage1 = None
        self._saved_iter = None


# ------------------------------------------------------------------ fastreid's names
class _FastreidNames(nn.Module):
    """:class:`FTLBaseline`'s modules under the names of fastreid's ``Baseline``, for fastreid's
    own optimizer and freeze rules: ``backbone`` (``Enc``'s backbone: ``MODEL.FREEZE_LAYERS``),
    ``heads`` (what fastreid's ``EmbeddingHead`` holds: ``Enc``'s pooling, ``R``, the embedding,
    and ``FC``: ``SOLVER.HEADS_LR_FACTOR``), ``decoder`` (``Dec``) and ``ftl`` (anything else).
    It holds the model's own modules and builds nothing."""

    def __init__(self, meta: FTLBaseline) -> None:
        super().__init__()
        ftl = meta.ftl
        self.backbone = ftl.encoder.backbone
        self.heads = nn.ModuleDict(
            {
                "pool_layer": cast(nn.Module, ftl.encoder.pool),
                "filter": ftl.filter,
                "classifier": ftl.classifier,
            }
        )
        if ftl.decoder is not None:  # a child of its own: FREEZE_LAYERS [decoder] puts it in eval
            self.decoder = ftl.decoder
        self.ftl = ftl  # registered last: its parts are named above (`ftl` matches no parameter)


def _check_freeze_layers(cfg: CfgNode, names: _FastreidNames) -> None:
    """Refuse a ``MODEL.FREEZE_LAYERS`` entry that matches no parameter name (fastreid matches
    them from the start of ``backbone.*`` / ``heads.*`` / ``decoder.*``) while
    ``SOLVER.FREEZE_ITERS`` is on: fastreid would freeze nothing and still log the layer group as
    frozen (``ftl``, the whole model, is one such: its parts have the names above)."""
    if int(cfg.SOLVER.FREEZE_ITERS) <= 0:
        return
    params = [n for n, _ in names.named_parameters()]
    for layer in cfg.MODEL.FREEZE_LAYERS:
        if not any(re.match(layer, n) for n in params):
            raise ValueError(
                f"MODEL.FREEZE_LAYERS: {layer!r} matches no parameter of FTLBaseline; under "
                "fastreid's names its parameters are backbone.* (Enc's backbone), heads.* "
                "(heads.pool_layer, heads.filter: R, heads.classifier: FC) and decoder.* (Dec)"
            )


class _FTLLayerFreeze(hooks.LayerFreeze):
    """fastreid's ``LayerFreeze`` over :class:`_FastreidNames`: the named groups (``backbone``)
    in eval mode for ``SOLVER.FREEZE_ITERS`` iterations (fastreid's optimizer holds back their
    gradients). FTL's stage switches, UpdateStats and the evaluation hook set the model's train
    mode again, so the groups go back to eval before and after every frozen step (fastreid's
    PreciseBN, at the epoch's end, then leaves them alone as it does Baseline's); when they open,
    the parts that FTL's stage keeps fixed stay in eval."""

    def __init__(self, meta: FTLBaseline, freeze_layers: Sequence[str], freeze_iters: int) -> None:
        super().__init__(_FastreidNames(meta), freeze_layers, freeze_iters)
        self._ftl = meta.ftl

    def before_step(self) -> None:
        super().before_step()
        if self.trainer.iter >= self.freeze_iters:  # fastreid's optimizer counts its own steps
            for group in self.trainer.optimizer.param_groups:  # from 0 again after a resume:
                if group.get("freeze_status") == "freeze":  # the iteration decides, as here
                    group["freeze_status"] = "normal"
        self._keep_frozen()

    def after_step(self) -> None:  # after FTLHook's stage switch, before PreciseBN's epoch end
        self._keep_frozen()

    def _keep_frozen(self) -> None:
        if self.is_frozen:
            for name, module in self.model.named_children():
                if name in self.freeze_layers:
                    module.eval()

    def open_all_layer(self) -> None:
        super().open_all_layer()
        self._ftl.train(self._ftl.training)  # FTL's frozen parts back in eval


def _in_model_order(
    optimizer: torch.optim.Optimizer, params: List[Dict[str, Any]], model: nn.Module
) -> None:
    """Order the (new, stepless) optimizer's parameter groups as ``model.parameters()``: the
    order of an optimizer built over the model itself, which checkpoints of earlier releases
    hold their per-group state in (fastreid's loader pairs groups by position; on the names of
    :class:`_FastreidNames` ``Dec`` came after ``R`` and ``FC``)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}

    def first(group: Dict[str, Any]) -> int:
        return min(order[id(p)] for p in group["params"])

    optimizer.param_groups.sort(key=first)
    params.sort(key=first)


# ------------------------------------------------------------------ the trainer
class FTLTrainer(DefaultTrainer):
    """fastreid's ``DefaultTrainer`` with these changes for FTL: the optimizer is built over the
    parameters themselves (``contiguous=False``, so that frozen parts get no weight decay or
    momentum step) by fastreid's ``build_optimizer`` on Baseline's names
    (:class:`_FastreidNames`: ``MODEL.FREEZE_LAYERS: [backbone]`` freezes ``Enc``'s backbone,
    ``SOLVER.HEADS_LR_FACTOR`` applies to ``R`` and ``FC``),
    fastreid's ``LayerFreeze`` hook works on the same names, and :class:`FTLHook` is registered
    right after the LR scheduler hook. Eq. 5's quality filter comes from
    :meth:`build_ftl_quality` (override it, as fastreid's ``build_*`` class methods)."""

    @classmethod
    def build_optimizer(
        cls, cfg: CfgNode, model: nn.Module
    ) -> Tuple[torch.optim.Optimizer, List[Dict[str, Any]]]:
        meta = _unwrap(model)
        if isinstance(meta, FTLBaseline):  # fastreid's rules on Baseline's names
            names = _FastreidNames(meta)
            _check_freeze_layers(cfg, names)
            optimizer, params = solver_build.build_optimizer(cfg, names, contiguous=False)
            _in_model_order(optimizer, params, meta)
            return optimizer, params
        return solver_build.build_optimizer(cfg, model, contiguous=False)

    def build_hooks(self) -> List[HookBase]:
        ret = super().build_hooks()
        meta = _unwrap(self.model)
        if isinstance(meta, FTLBaseline):  # fastreid's LayerFreeze sees only the child `ftl`
            ret = [
                _FTLLayerFreeze(meta, h.freeze_layers, h.freeze_iters)
                if isinstance(h, hooks.LayerFreeze)
                else h
                for h in ret
            ]
        position = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)), 0)
        ret.insert(position, FTLHook.from_trainer(self, quality=self.build_ftl_quality(self.cfg)))
        return ret

    @classmethod
    def build_ftl_quality(cls, cfg: CfgNode) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
        """Eq. 5's quality filter Omega for UpdateStats's centers: ``(x, g) -> (B,)
        bool`` (x: the preprocessed images, g: their rich features; the paper keeps faces with
        yaw below ``tau``). ``None`` (this default): every image counts."""
        return None

    @property
    def ftl_hook(self) -> FTLHook:
        """The registered :class:`FTLHook`."""
        return next(h for h in self._hooks if isinstance(h, FTLHook))
