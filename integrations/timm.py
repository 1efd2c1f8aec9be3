"""timm adapter: :class:`LEAPTask`, a ``timm.task.TrainingTask`` for a timm backbone + LEAP head.

The swap, in a timm task-based training loop::

    task = ClassificationTask(timm.create_model("resnet50", num_classes=1000))   # before
    task = LEAPTask.from_timm("resnet50", num_classes=1000, cloud="full",        # after
                              class_counts=counts)
    result = task(images, labels)          # {"loss", "output", "leap_loss"[, "metric_l2_loss"]}
    result["loss"].backward()

Layout follows timm's ``FeatureDistillationTask``: the **eval model** is the backbone alone
(``timm.create_model(name, num_classes=0)``: it outputs embeddings, so its checkpoint
``state_dict`` loads straight into that model for retrieval/verification), while the LEAP head
(class weights, cloud statistics, step counter, RNG) is **task state** (``get_task_state`` /
``load_task_state``, written by timm as ``task_state`` next to ``state_dict``). The evaluator
reports closed-set top-1/top-5 of the head's ``s cos(theta)`` logits. No math here: the loss is
:class:`feature_cloud.LEAPMarginHead` (LEAP Eq. 1-8) plus optionally
:class:`feature_cloud.MetricL2` (FTL Eq. 3).

:class:`FTLTask` is the FTL option: ``Enc = timm.create_model(name, num_classes=0)`` inside an
:class:`feature_cloud.FTLModel` (``Enc -> g -> R -> f -> FC``, optional ``Dec``) whose ``FC`` is a
``LEAPMarginHead`` (or the paper's linear softmax), trained with Algorithm 1 by an
:class:`feature_cloud.AlternatingScheduler` that the task owns.
"""

from __future__ import annotations

import logging
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
    cast,
    overload,
)

import torch
from torch.utils.data import DataLoader
from typing_extensions import Unpack

from feature_cloud._extras import missing

try:
    import timm
except ImportError as _err:
    raise missing(
        "feature_cloud.integrations.timm", "timm", "pip install 'feature-cloud[timm]'", _err
    ) from _err
try:
    from timm.task import ClassificationEvaluator, TrainingTask
except ImportError as _err:  # timm.task: 1.0.25; its ClassificationEvaluator: 1.0.31
    raise ImportError(
        "feature_cloud.integrations.timm needs timm >= 1.0.31 (timm.task.TrainingTask and "
        f"timm.task.ClassificationEvaluator); this is timm {timm.__version__}: "
        "pip install 'timm>=1.0.31'"
    ) from _err
from timm.models._manipulate import group_with_matcher  # group_parameters without a module
from timm.utils.model import unwrap_model
from timm.utils.model_ema import ModelEmaV3
from torch import Tensor, nn

from feature_cloud import functional as FC
from feature_cloud._buffers import restore_on_error
from feature_cloud._validation import (
    as_bool,
    as_float,
    as_int,
    check_inputs,
    class_counts_from_mapping,
    migrate_checked,
)
from feature_cloud.checkpoints import CheckedBeforeLoading
from feature_cloud.cloud import FeatureCloud
from feature_cloud.ftl import (
    DEFAULT_TAIL_SAMPLING,
    AlternatingScheduler,
    ConvDecoder,
    FTLModel,
    check_encoded,
    check_update_stats_callables,
    make_filter,
)
from feature_cloud.functional import DEFAULT_RECON_REDUCTION
from feature_cloud.heads import HeadOptions, LEAPMarginHead, hooked_weight, scoring_weight
from feature_cloud.regularizers import MetricL2, as_metric_l2, warn_metric_l2_with_margin
from feature_cloud.statistics import ClassStatistics
from feature_cloud.transfer import FeatureTransfer

_logger = logging.getLogger(__name__)

__all__ = [
    "LEAPTask",
    "LEAPTrainableModule",
    "LEAPEvaluator",
    "create_backbone_and_head",
    "FTLTask",
    "FTLEmbedding",
    "TimmFTLModel",
    "create_ftl_model",
    "ModelEmaV3Following",
    "TimmHeadOptions",
]


_UNPOOLED = (
    "outputs unpooled feature maps, not the (batch, num_features) embeddings the head needs: "
    "give it a pooling (timm's default global_pool, e.g. 'avg'; reset_classifier(0, 'avg'))"
)


def _unpooled(backbone: nn.Module) -> bool:
    """Whether a timm model was built (or reset) with ``global_pool=''``: its pooling, on the
    model or on its ``head`` (ConvNeXt), is timm's identity (a ``SelectAdaptivePool2d`` whose
    ``is_identity()``, or the pool type ``''`` as a string, ViT's)."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str) and pool == "":
            return True
        if isinstance(pool, nn.Module) and callable(getattr(pool, "is_identity", None)):
            if pool.is_identity():
                return True
    return False


def _refuse_unpooled(backbone: nn.Module, what: str) -> None:
    """A backbone without pooling refused before it runs (its BatchNorm would take the batch,
    then the head refused the 4-D output)."""
    if _unpooled(unwrap_model(backbone)):
        raise ValueError(f"{what} {_UNPOOLED}")


def _headless_backbone(
    model_name: str, pretrained: bool, model_kwargs: Optional[Dict[str, Any]]
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0, **model_kwargs)``: pooled embeddings."""
    if model_kwargs and "num_classes" in model_kwargs:
        raise TypeError(
            f"model_kwargs sets num_classes={model_kwargs['num_classes']!r}: the backbone is "
            "built with num_classes=0 (it outputs embeddings; the head is the classifier). Give "
            "the number of classes as the num_classes argument"
        )
    if model_kwargs and model_kwargs.get("global_pool", None) == "":
        raise ValueError(f"model_kwargs sets global_pool='': {model_name} then {_UNPOOLED}")
    backbone = timm.create_model(
        model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {})
    )
    _refuse_unpooled(backbone, f"{model_name} (model_kwargs={model_kwargs!r})")
    return backbone


class TimmHeadOptions(HeadOptions, total=False):
    """The ``**head_kwargs`` of :func:`create_backbone_and_head` and ``LEAPTask.from_timm``:
    :class:`~feature_cloud.heads.HeadOptions` (the head's keywords, the cloud's), and
    ``embedding_size``, accepted only where it equals the backbone's ``num_features``."""

    embedding_size: int


def create_backbone_and_head(
    model_name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **head_kwargs: Unpack[TimmHeadOptions],
) -> Tuple[nn.Module, LEAPMarginHead]:
    """``timm.create_model(model_name, num_classes=0)`` and a matching :class:`LEAPMarginHead`.

    The backbone outputs pooled embeddings of size ``num_features``; ``head_kwargs`` go to
    :class:`LEAPMarginHead` (``margin_type``, ``scale``, ``margin``, ``cloud``,
    ``class_counts``, ``warmup_steps``, ...). ``pretrained`` and ``model_kwargs`` (a dict of
    further keywords) go to ``timm.create_model``.
    """
    # as the head refuses 6.7 or "6" (int() truncated them), before the backbone is built
    num_classes = as_int(num_classes, "num_classes", 1)
    backbone = _headless_backbone(model_name, pretrained, model_kwargs)
    features = int(backbone.num_features)
    size = head_kwargs.pop("embedding_size", None)
    if size is not None and size != features:
        raise ValueError(
            f"embedding_size={size!r}: the head's embedding size is {model_name}'s "
            f"num_features={features} (the backbone's pooled embedding; leave embedding_size "
            "out). For embeddings of another size, give the timm model a projection of that "
            "size (model_kwargs) or use FTLTask / create_ftl_model, whose embedding_size is R's"
        )
    head = LEAPMarginHead(features, num_classes, **head_kwargs)
    return backbone, head


def _has_task_state(state: Optional[Dict[str, Any]], strict: bool, what: str) -> bool:
    """timm's ``load_task_state`` contract: an empty state is an error only when ``strict``."""
    if state:
        return True
    if strict:
        raise RuntimeError(f"the checkpoint has no {what} task state ('task_state')")
    return False


def _forget_compiled_ema(task: TrainingTask) -> None:
    """A new EMA copy is not the one ``compile_ema()`` compiled: drop the old ``eval_model_ema``."""
    if hasattr(task, "eval_model_ema"):
        del task.eval_model_ema


def _compiled_eval_model(task: TrainingTask, ema: bool) -> Optional[nn.Module]:
    """timm's base ``get_eval_model``: ``eval_model`` / ``eval_model_ema`` once ``compile()`` /
    ``compile_ema()`` set them."""
    return getattr(task, "eval_model_ema" if ema else "eval_model", None)


_UNMATCHED = "\x00feature_cloud adapter"
"""A parameter name no timm ``group_matcher`` matches: the adapter's parameters' layer group."""


def _refuse_backbone_classifier(owner: Any, wrapped: nn.Module) -> None:
    """:meth:`_BackboneOptimizerHooks._refuse_backbone_classifier` of ``owner`` holding the timm
    backbone ``wrapped`` (a child of ``owner``; named in the message)."""
    backbone = unwrap_model(wrapped)
    classes = getattr(backbone, "num_classes", 0)
    path = next((name + "." for name, child in owner.named_children() if child is wrapped), "")
    if classes:
        raise ValueError(
            f"the backbone has a classifier (num_classes={classes}, e.g. after "
            f"reset_classifier({classes})): it outputs logits, not the embeddings the head "
            f"needs. Call {path}reset_classifier(0); the head is the classifier"
        )
    _refuse_unpooled(backbone, f"the backbone ({path or 'backbone.'}global_pool='')")


class _BackboneOptimizerHooks:
    """timm's optimizer hooks for a module around a timm backbone, as timm's
    ``FeatureDistillationTrainableModule`` does for its student: ``create_optimizer_v2`` sees the
    backbone's ``no_weight_decay()`` and ``group_matcher()`` (layer decay) under the backbone's
    prefix; the other parameters (the head; ``R``, ``FC``, ``Dec``) are in the last layer group,
    where timm puts a model's unmatched classifier head. Like timm's ``fc.weight``, the
    classifier's weight gets weight decay unless ``head_weight_decay`` is ``False``."""

    head_weight_decay: bool = True
    """``False``: the classifier's parameters (the LEAP head; FTL's ``FC``) are in
    :meth:`no_weight_decay`. A cosine head's logits do not depend on ``||W||``: weight decay
    only shrinks it, which raises the weight's effective learning rate."""

    def _timm_backbone(self) -> nn.Module:
        raise NotImplementedError

    def _classifier(self) -> nn.Module:
        raise NotImplementedError

    def _backbone_and_prefix(self) -> Tuple[nn.Module, str]:
        backbone = unwrap_model(self._timm_backbone())  # through compile / DDP wrappers
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if module is backbone:
                return backbone, name + "."
        raise RuntimeError("the backbone is not a submodule of this module")

    def no_weight_decay(self) -> Set[str]:
        """The backbone's (under its prefix), and the classifier's parameters when
        ``head_weight_decay`` is ``False``."""
        backbone, prefix = self._backbone_and_prefix()
        names = (
            {prefix + name for name in backbone.no_weight_decay()}
            if hasattr(backbone, "no_weight_decay")
            else set()
        )
        if not self.head_weight_decay:
            head = {id(p) for p in self._classifier().parameters()}
            own = self.named_parameters()  # type: ignore[attr-defined]
            names |= {name for name, p in own if id(p) in head}
        return names

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """The backbone's layer groups (timm's ``group_with_matcher`` on its parameter names);
        the adapter's own parameters are grouped as a name the backbone's matcher leaves
        unmatched: timm's last group, where it puts a classifier together with the backbone's
        unmatched neck (ConvNeXt's ``head.norm``, MobileNetV3's ``conv_head``), so every
        backbone parameter gets the ``lr_scale`` of the same model built with ``num_classes``."""
        backbone, prefix = self._backbone_and_prefix()
        if not hasattr(backbone, "group_matcher"):
            return lambda name: 0 if name.startswith(prefix) else 1
        names = [name for name, _ in backbone.named_parameters()]
        layers: Dict[str, int] = group_with_matcher(
            [(name, None) for name in [*names, _UNMATCHED]],
            backbone.group_matcher(coarse=coarse),
            reverse=True,
        )
        head = layers.pop(_UNMATCHED)

        def _matcher(name: str) -> int:
            if name.startswith(prefix):
                return layers.get(name[len(prefix) :], 0)
            return head

        return _matcher

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The backbone's (``timm.data.resolve_data_config(model=...)`` reads it: input size,
        mean, std, interpolation; it fell back to 224 px ImageNet settings)."""
        return dict(getattr(self._backbone_and_prefix()[0], "pretrained_cfg", None) or {})

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    def _refuse_backbone_classifier(self) -> None:
        """A timm backbone given a classifier again (``reset_classifier(n)``) outputs ``n``
        logits, not embeddings, and one reset to ``global_pool=''`` feature maps: refused
        before it runs (its BatchNorm would take the batch). Checked by the training forward
        and by the eval models (:meth:`LEAPTask.get_eval_model`, :class:`FTLEmbedding`)."""
        _refuse_backbone_classifier(self, self._timm_backbone())

    def get_classifier(self) -> nn.Module:
        """timm's model method: the classifier (the LEAP head; FTL's ``FC``)."""
        return self._classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Refused: timm's ``reset_classifier`` builds a fresh classifier for ``num_classes``,
        but this classifier carries per-class statistics (class counts, centers, angle memory;
        FTL's transfer statistics) and settings that a plain resize would lose or leave sized
        for the old classes."""
        raise NotImplementedError(
            f"{type(self).__name__}.reset_classifier({num_classes!r}) is not supported: the "
            f"classifier ({type(self._classifier()).__name__}) holds per-class statistics "
            "(class counts, centers, angle memory) sized for its classes. For embeddings use "
            "the task's eval model (task.get_eval_model(): the backbone, no classifier); for "
            "other classes build a new task on the trained backbone, e.g. "
            "LEAPTask(task.backbone, LEAPMarginHead(task.head.embedding_size, num_classes, "
            "..., class_counts=new_counts)) (FTL: create_ftl_model / FTLModel with a new FC "
            "and FeatureTransfer); the backbone's pooling is "
            "task.backbone.reset_classifier(0, global_pool)"
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The backbone's gradient checkpointing (timm's ``--grad-checkpointing``)."""
        backbone = self._backbone_and_prefix()[0]
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise NotImplementedError(
                f"{type(backbone).__name__} has no set_grad_checkpointing (a timm model's)"
            )
        backbone.set_grad_checkpointing(enable)


def _wrapped(module: nn.Module) -> Optional[nn.Module]:
    """The module a wrapper holds (DDP's and ``ModelEmaV3``'s ``module``, ``torch.compile``'s
    ``_orig_mod``), one level; ``None`` for a module that wraps none."""
    inner = getattr(module, "module", None)
    if inner is None:
        inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


class _AllOrNothingLoad(TrainingTask):
    """timm's ``load_checkpoint_state`` (``resume_task_checkpoint``, ``load_task_ema_checkpoint``)
    writes the eval model's weights, then the task state; here a task state that is refused
    leaves the weights (of the EMA copy with ``ema=True``) as they were."""

    if TYPE_CHECKING:  # typing only: timm's methods run
        # timm types it Optional (the EMA copy may not exist); the task's own module always
        # exists, so without ``ema=True`` it is typed ``nn.Module`` (README / example code
        # ``task.get_trainable_module().parameters()`` type-checks; get_eval_model likewise)
        @overload
        def get_trainable_module(self, ema: Literal[False] = ...) -> nn.Module: ...

        @overload
        def get_trainable_module(self, ema: bool) -> Optional[nn.Module]: ...

        def get_trainable_module(self, ema: bool = False) -> Optional[nn.Module]: ...

    def _restoring(self, modules: Sequence[nn.Module]) -> ContextManager[None]:
        return restore_on_error(*modules)

    def load_checkpoint_state(
        self,
        state_dict: Dict[str, Any],
        task_state: Optional[Dict[str, Any]] = None,
        ema: bool = False,
        strict: bool = True,
    ) -> None:
        module = self.get_trainable_module(ema=ema)
        with self._restoring([] if module is None else [module]):
            super().load_checkpoint_state(state_dict, task_state, ema=ema, strict=strict)


_STATISTICS: Tuple[type, ...] = (FeatureCloud, ClassStatistics, FeatureTransfer)
"""Modules whose buffers are one history (sums, memories, counters, centers, the FTL basis)."""


def _statistics_buffers(model: nn.Module) -> Dict[str, Tensor]:
    """Every buffer of the statistics modules in ``model`` (:data:`_STATISTICS`), by name."""
    found: Dict[str, Tensor] = {}
    for owner, module in model.named_modules():
        if isinstance(module, _STATISTICS):
            found.update(module.named_buffers(prefix=owner))
    return found


class ModelEmaV3Following(ModelEmaV3):
    """timm's ``ModelEmaV3`` for models with class statistics.

    Weights and the other buffers (BatchNorm running statistics) are timm's average. The buffers
    of the statistics modules (:class:`FeatureCloud` with its :class:`ClassStatistics`,
    :class:`FeatureTransfer`) are copied from the model: angle sums averaged against copied
    counts, or an averaged PCA basis, are no statistics of anything (and the EMA evaluator's
    prototypes are the EMA centers). A buffer that changes shape in the model (the angle memory
    laid out where an online count ends, FTL's basis and sample lists at every UpdateStats)
    is replaced in the copy before timm's update, which pairs tensors by position in place.
    ``exclude_buffers=True`` (timm's): every buffer copied, BatchNorm's too.
    """

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """timm's EMA step from ``model`` (unwrapped), the statistics buffers copied, not
        averaged, and a buffer of another shape replaced first (the class docstring)."""
        model = unwrap_model(model)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            mine = ema_buffers.get(name)
            if mine is not None and mine.shape != buf.shape:
                owner, _, attr = name.rpartition(".")
                target = self.module.get_submodule(owner) if owner else self.module
                setattr(target, attr, buf.detach().to(device=mine.device, copy=True))
        super().update(model, step=step)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in _statistics_buffers(model).items():
            ema_buffers[name].copy_(buf)


def refuse_soft_target(target: Optional[Tensor], task: str) -> None:
    """A ``(B, C)`` float target (timm's ``Mixup`` / ``CutMix``) named as such: a margin loss
    and the class statistics need each sample's class."""
    if isinstance(target, Tensor) and target.is_floating_point() and target.dim() == 2:
        raise TypeError(
            f"{task} got a soft target of shape {tuple(target.shape)} (timm's Mixup / CutMix, "
            "with any label smoothing folded in): the margin loss and the cloud's class "
            "statistics need each sample's class. Train without mixup and cutmix (train.py "
            "--mixup 0 --cutmix 0, its defaults; mixing two identities makes no sample of "
            "either) and give the task label_smoothing=eps instead"
        )


def require_target(target: Optional[Tensor], task: str) -> None:
    """A task's batch without its targets (``task(x, None)``), refused before the backbone runs:
    the trainable module returned the logits, which a batch of 3 unpacked silently as the loss,
    the output and the embeddings."""
    if target is None:
        raise TypeError(
            f"{task} needs the batch's class indices: task(input, target), as timm's training "
            "loop calls it; for logits without targets use task.trainable_module(input) (or "
            "the eval model's embeddings)"
        )


#: what a whole-module pickle of a :class:`LEAPTrainableModule` of an earlier release may lack:
#: attribute -> the value that gives that release's behaviour
_PICKLE_PREDATES: Dict[str, Any] = {"label_smoothing": 0.0}  # before the option: none


class LEAPTrainableModule(_BackboneOptimizerHooks, CheckedBeforeLoading, nn.Module):
    """Backbone + head in one Module (what DDP wraps and what EMA copies).

    ``forward(input, target)`` returns ``(loss, logits, embeddings)``; ``forward(input)`` returns
    the plain ``s cos(theta)`` logits. ``no_weight_decay()`` / ``group_matcher()`` are the
    backbone's (``backbone.*``), the head in the backbone's last layer group (where timm puts a
    classifier), for timm's ``create_optimizer_v2``.
    ``label_smoothing``: as ``F.cross_entropy``'s, in the head's margin loss.
    ``head_weight_decay=False``: ``head.weight`` in ``no_weight_decay()``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: LEAPMarginHead,
        label_smoothing: float = 0.0,
        head_weight_decay: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.label_smoothing = as_float(
            label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.head_weight_decay = as_bool(head_weight_decay, "head_weight_decay")

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases lack what :data:`_PICKLE_PREDATES` fills."""
        super().__setstate__(migrate_checked(state, predating=_PICKLE_PREDATES))

    def extra_repr(self) -> str:
        """``label_smoothing`` / ``head_weight_decay`` where they are not the defaults."""
        return ", ".join(
            ([f"label_smoothing={self.label_smoothing}"] if self.label_smoothing else [])
            + ([] if self.head_weight_decay else ["head_weight_decay=False"])
        )

    def _timm_backbone(self) -> nn.Module:
        return self.backbone

    def _classifier(self) -> nn.Module:
        return self.head

    @property
    def num_classes(self) -> int:
        """timm's model attribute: the head's classes (``forward(input)``'s logits)."""
        return self.head.num_classes

    @property
    def num_features(self) -> int:
        """timm's model attribute: the embedding size (the backbone's ``num_features``)."""
        return self.head.embedding_size

    def forward_features(self, input: Tensor) -> Tensor:
        """timm's model method: the backbone's unpooled features."""
        self._refuse_backbone_classifier()
        return self.backbone.forward_features(input)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's model method on :meth:`forward_features`' output: the pooled embeddings
        (``pre_logits=True``) or the head's ``s cos(theta)`` logits, as ``forward(input)``."""
        self._refuse_backbone_classifier()
        embeddings = self.backbone.forward_head(x, pre_logits=True)
        return embeddings if pre_logits else self.head.logits(embeddings)

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        @overload
        def __call__(self, input: Tensor, target: None = ...) -> Tensor: ...

        @overload
        def __call__(self, input: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, Tensor]: ...

        def __call__(
            self, input: Tensor, target: Optional[Tensor] = None
        ) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]: ...

    def forward(
        self, input: Tensor, target: Optional[Tensor] = None
    ) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        """``(loss, logits, embeddings)`` of a batch with its targets; the plain ``s cos(theta)``
        logits without ``target``."""
        self._refuse_backbone_classifier()  # checked before the backbone's BatchNorm takes
        if target is not None:  # the batch
            refuse_soft_target(target, "LEAPTask")
            head = self.head
            check_inputs(input, target, head.num_classes, head.validate, "target")
        embeddings = self.backbone(input)
        if target is None:
            return self.head.logits(embeddings)
        loss = self.head(embeddings, target, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            logits = self.head.logits(embeddings)
        return loss, logits, embeddings


def _check_training_classes(target: Tensor, num_classes: int) -> None:
    """``ValueError`` naming the label range unless every label of ``target`` is one of the
    head's ``num_classes`` training classes (torch's cross-entropy said only "Target 316 is out
    of bounds"): held-out identities (re-ID test sets) are retrieved, not classified. One host
    read a batch (evaluation only)."""
    if not isinstance(target, Tensor) or target.dim() != 1 or target.is_floating_point():
        return  # timm's own checks (soft targets ...)
    if target.numel() == 0:
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"LEAPEvaluator: labels {low}..{high} reach outside the head's training classes "
            f"0..{num_classes - 1}: the evaluator scores closed-set classification (top-1 among "
            "the classes the head trained on). For held-out identities (a re-ID query / gallery "
            "split) embed with task.get_eval_model() and retrieve: "
            "feature_cloud.demo.metrics.retrieval_per_query(features, labels) gives leave-one-out "
            "rank-1 and AP per query (feature_cloud.evaluate.runner.camera_retrieval(features, "
            "labels, camids) the cross-camera ones)"
        )


def _stock_logits(head: nn.Module, part: nn.Module) -> bool:
    """Whether ``head.logits`` is the package's own all the way down: a
    :class:`~feature_cloud.LEAPMarginHead` (or an :class:`~feature_cloud.FTLModel` over one)
    whose ``logits`` no subclass or instance replaced. Only then may the evaluator score
    against its cached matrices (:meth:`LEAPEvaluator._scoring`); any other ``logits`` is
    called as it is."""
    if not isinstance(part, LEAPMarginHead):
        return False
    for name in ("logits", "_score"):  # the cached path calls _score(output, scoring)
        if getattr(type(part), name) is not getattr(LEAPMarginHead, name) or name in vars(part):
            return False
    if "logits" in vars(head):
        return False
    return head is part or type(head).logits is FTLModel.logits


class LEAPEvaluator(ClassificationEvaluator):
    """timm's classification evaluator on the head's logits of the eval model's embeddings
    (``head``: a :class:`LEAPMarginHead`, or an :class:`FTLModel` whose ``logits(f)`` is its FC).

    ``loss``, ``top1``, ``top5``: the head's inference logits, in eval mode whatever mode the
    loop left the head in (a timm loop puts only :meth:`LEAPTask.get_eval_model`, the backbone,
    in eval mode): with the default ``prototype_shrinkage`` the inference prototypes.
    ``top1_weights``: top-1 against the class weights themselves (the head in train mode: the
    paper's logits), to see what the prototypes change.

    A :class:`LEAPMarginHead`'s scoring matrices (the normalised prototypes, the normalised
    weights) are built once an evaluation and reused for every batch, as ``head.as_linear()``
    would be (``head.logits`` rebuilds the prototypes from all ``C x D`` on every call): the
    same logits. ``compute()`` and ``reset()`` drop them (no ``C x D`` copies held between
    evaluations); they are rebuilt before that whenever a parameter or buffer of the head was replaced or changed in place (version
    counters; a write through ``.data`` is not seen) or a setting the prototypes read changed.
    """

    metric_names = ("loss", "top1", "top5", "top1_weights")

    def __init__(
        self,
        head: Union[LEAPMarginHead, FTLModel],
        device: Optional[torch.device] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, **kwargs)
        self.head = head

    def reset(self) -> None:
        """timm's reset, and this evaluator's counts and scoring matrices dropped."""
        super().reset()
        # timm's counts (examples, top-1, top-5) and the weights' top-1: one all-reduce for all
        self.counts = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._entered_eval = False
        #: train mode (bool) -> (key, [the head's tensors, held], (weight, unit)): the scoring
        #: matrices of this evaluation (:meth:`_scoring`)
        self._scorings: Dict[bool, Tuple[Any, Any, Tuple[Tensor, bool]]] = {}

    def _logits(self, output: Tensor, training: bool) -> Tensor:
        """The head's logits with the classifier in the given mode (every module's own mode
        put back afterwards). Mode flags are set directly: ``train()`` itself runs once an
        evaluation (a cloud-less head reads there whether it holds centers, one host read),
        not on every batch."""
        head = self.head
        part = head.classifier if isinstance(head, FTLModel) else head
        modes = [(m, m.training) for m in part.modules()]
        try:
            if not training and not self._entered_eval:
                part.eval()
                self._entered_eval = True
            for module, _ in modes:
                module.training = training
            if _stock_logits(head, part):
                return part._score(output, self._scoring(part, output, training))
            return head.logits(output)
        finally:
            for module, mode in modes:
                module.training = mode

    def _scoring(self, head: LEAPMarginHead, output: Tensor, training: bool) -> Tuple[Tensor, bool]:
        """``(weight, True)``: the unit rows ``head.logits`` scores against in the head's
        current mode, in the dtype it computes in for ``output``, built on the first batch of
        an evaluation and kept while nothing it reads changes. The key holds each parameter's
        and buffer's identity, storage address and version counter (the cache keeps the
        tensors alive, so no address is reused) and the settings of the prototypes; a tensor
        without a version counter (an inference tensor) disables the cache."""
        cloud = head.feature_cloud
        tensors = [*head.parameters(), *head.buffers()]
        try:
            state = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors track no version: build every time
            state = None
        settings = (
            output.dtype,
            head.sub_centers,
            id(cloud),
            id(cloud.statistics),
            cloud.rule,
            cloud.prototype_shrinkage,
            cloud.prototype_min_count,
            getattr(cloud.statistics, "has_centers", False),
            type(cloud),
        )
        key = None if state is None else (state, settings)
        held = self._scorings.get(training)
        if key is not None and held is not None and held[0] == key:
            return held[2]
        weight, unit = scoring_weight(cloud, hooked_weight(head).detach(), head.sub_centers)
        if weight.dtype != output.dtype:  # cosine_logits' cast, once
            weight = FC.common_float(output, weight)[1]
        scoring = (FC.unit_rows(weight, unit), True)  # cosine_logits' normalisation, once
        if key is not None:
            self._scorings[training] = (key, [t.detach() for t in tensors], scoring)
        return scoring

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        """Count a batch of eval-model ``output`` (embeddings, scored by the head) against
        ``target``: timm's loss / top-1 / top-5 and the weights' top-1 (``top1_weights``)."""
        seen = self.num_samples
        logits = self._logits(output, False)
        _check_training_classes(target, logits.shape[-1])
        super().update(logits, target)
        used = self.num_samples - seen  # the rows timm kept (max_samples)
        if used:
            weights = self._logits(output[:used], True)
            hits = weights.argmax(1).eq(target[:used].to(weights.device)).sum()
            self.counts[3] += hits.to(self.counts.device)

    def compute(self, distributed: bool = False) -> Any:
        """timm's end-of-evaluation metrics; drops the scoring matrices (:meth:`_scoring`)."""
        self._scorings.clear()
        return super().compute(distributed)

    def _summary(self, loss_sum: Tensor, counts: Tensor) -> Any:
        out = super()._summary(loss_sum, counts[:3])
        out["top1_weights"] = 100 * int(counts[3]) / max(int(counts[0]), 1)
        return out


_Module = TypeVar("_Module", bound=nn.Module)


def _placed(module: _Module, device: Optional[torch.device]) -> _Module:
    """The task's model where the user put it, as timm's ``ClassificationTask`` leaves it: moved
    only to a ``device`` given explicitly (not to ``TrainingTask``'s default cpu, which would pull
    a model already on a GPU back to the host, and fail for one built under
    ``with torch.device("meta")``)."""
    return module if device is None else module.to(device=device)


class LEAPTask(_AllOrNothingLoad):
    """Metric-learning training task: timm backbone -> embeddings -> LEAP margin loss.

    Args:
        model: a timm model created with ``num_classes=0`` (outputs ``(B, D)`` embeddings).
        head: the :class:`LEAPMarginHead` (``embedding_size`` must equal ``model.num_features``).
        metric_l2: optional ``alpha`` of the m-L2 regulariser (FTL Eq. 3) added to the loss (a
            float, or a :class:`feature_cloud.MetricL2`: its ``alpha``).
        label_smoothing: as timm's ``--smoothing`` (``F.cross_entropy``'s), inside the margin
            loss; timm's loader-side smoothing and Mixup / CutMix give soft targets, refused.
        head_weight_decay: ``False`` leaves the head's weight out of ``create_optimizer_v2``'s
            weight decay (it is in the trainable module's ``no_weight_decay()``).
        device, dtype, verbose: as in ``timm.task.TrainingTask``; the model stays where it is
            (as timm's ``ClassificationTask`` leaves it) unless ``device`` is given, then it is
            moved there.
    """

    def __init__(
        self,
        model: nn.Module,
        head: LEAPMarginHead,
        metric_l2: Union[None, float, MetricL2] = None,
        label_smoothing: float = 0.0,
        head_weight_decay: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(head, LEAPMarginHead):
            raise TypeError(
                f"head must be a feature_cloud.LEAPMarginHead, got {type(head).__name__}"
            )
        _refuse_unpooled(model, "the backbone")
        features = getattr(unwrap_model(model), "num_features", None)
        if features is not None and int(features) != head.embedding_size:
            raise ValueError(
                f"the backbone outputs num_features={features} but the head expects "
                f"embedding_size={head.embedding_size}"
            )
        self.trainable_module = _placed(
            LEAPTrainableModule(model, head, label_smoothing, head_weight_decay), device
        )
        self.metric_l2 = as_metric_l2(metric_l2)
        if self.metric_l2 is not None:
            warn_metric_l2_with_margin("LEAPMarginHead", "metric_l2", self.metric_l2.alpha)

    @classmethod
    def from_timm(
        cls,
        model_name: str,
        num_classes: int,
        *,
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        metric_l2: Union[None, float, MetricL2] = None,
        label_smoothing: float = 0.0,
        head_weight_decay: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        **head_kwargs: Unpack[TimmHeadOptions],
    ) -> LEAPTask:
        """Build the backbone and head with :func:`create_backbone_and_head` and wrap them."""
        backbone, head = create_backbone_and_head(
            model_name, num_classes, pretrained=pretrained, model_kwargs=model_kwargs, **head_kwargs
        )
        return cls(
            backbone,
            head,
            metric_l2=metric_l2,
            label_smoothing=label_smoothing,
            head_weight_decay=head_weight_decay,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    # ------------------------------------------------------------------ parts
    def _parts(self, module: Optional[nn.Module] = None, ema: bool = False) -> LEAPTrainableModule:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError(
                "the EMA module does not exist yet: call setup_ema() first"
                if ema
                else "the task has no trainable module"
            )
        current: Optional[nn.Module] = module
        while not isinstance(current, LEAPTrainableModule):
            if current is None:
                raise TypeError(
                    f"cannot find the LEAP backbone/head inside {type(module).__name__}"
                )
            current = _wrapped(current)
        return current

    @property
    def head(self) -> LEAPMarginHead:
        return self._parts().head

    @property
    def backbone(self) -> nn.Module:
        return self._parts().backbone

    # ------------------------------------------------------------------ timm task hooks
    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> LEAPTask:
        """DDP over backbone + head. The class statistics are synchronised across the ranks by
        the head itself (``sync="auto"``, its default): identical on every rank, no extra call."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def setup_ema(
        self,
        decay: float = 0.9999,
        use_warmup: bool = False,
        device: Optional[torch.device] = None,
        **kwargs: Any,
    ) -> ModelEmaV3Following:
        """timm's EMA of backbone + head (:class:`ModelEmaV3Following`); ``task.update_ema()``
        (or ``update_ema(step=...)``) or ``ema.update(task.get_trainable_module())`` after each
        optimiser step. Weights and BatchNorm statistics are averaged; the head's statistics
        (centers, angles, counts, step) are copied from the live head, and the EMA head's
        prototypes (its centers) score ``create_evaluator(ema=True)``."""
        _forget_compiled_ema(self)
        self.trainable_module_ema = ModelEmaV3Following(
            unwrap_model(self.get_trainable_module()),
            decay=decay,
            use_warmup=use_warmup,
            device=device,
            **kwargs,
        )
        return self.trainable_module_ema

    def compile(
        self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any
    ) -> nn.Module:
        """Compile the backbone, the eval model this returns (validation, checkpoint export).

        The head stays eager on its fused (or chunked) loss, which a compiled head replaces by
        the reference graph (more memory with very many classes). On a GPU a compiled head is
        faster (README, "On a GPU"): ``task.head.compile(fullgraph=True)`` compiles it in place
        (parameter names and checkpoints unchanged)."""
        parts = self._parts()
        parts.backbone = torch.compile(parts.backbone, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = parts.backbone
        return self.eval_model

    @overload
    def get_eval_model(
        self, module: Optional[nn.Module] = ..., ema: Literal[False] = ...
    ) -> nn.Module: ...

    @overload
    def get_eval_model(
        self, module: Optional[nn.Module] = ..., ema: bool = ...
    ) -> Optional[nn.Module]: ...

    def get_eval_model(
        self, module: Optional[nn.Module] = None, ema: bool = False
    ) -> Optional[nn.Module]:
        """The backbone alone (embeddings; the compiled one after ``compile()`` /
        ``compile_ema()``); the head is task state. A backbone given a classifier again (or
        reset to ``global_pool=''``) is refused here: its outputs are no embeddings."""
        try:
            parts = self._parts(module, ema)
        except RuntimeError:
            return None
        parts._refuse_backbone_classifier()
        compiled = _compiled_eval_model(self, ema) if module is None else None
        if compiled is not None:
            return compiled
        return parts.backbone

    def get_task_state(
        self, module: Optional[nn.Module] = None, ema: bool = False
    ) -> Dict[str, Any]:
        """``{"head": LEAPMarginHead.state_dict()}``: class weights, statistics, step and RNG."""
        return {"head": self._parts(module, ema).head.state_dict()}

    def load_task_state(
        self,
        state: Optional[Dict[str, Any]],
        strict: bool = True,
        module: Optional[nn.Module] = None,
        ema: bool = False,
    ) -> None:
        if not _has_task_state(state, strict, "LEAP head"):
            return
        if "head" not in state:
            raise KeyError(f"LEAP task state needs a 'head' entry, got keys {sorted(state)}")
        head = self._parts(module, ema).head
        with restore_on_error(head):  # all or nothing: torch's strict load refuses missing or
            head.load_state_dict(state["head"], strict=strict)  # unexpected keys after copying

    def create_evaluator(self, ema: bool = False, **kwargs: Any) -> LEAPEvaluator:
        """timm's top-1/top-5 on the head's logits; ``ema=True``: the EMA copy's head, to score
        ``get_eval_model(ema=True)``."""
        return LEAPEvaluator(self._parts(ema=ema).head, device=self.device, **kwargs)

    def get_clip_parameters(self, exclude_head: bool = False):
        parts = self._parts()
        if exclude_head:
            return parts.backbone.parameters()
        return parts.parameters()

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]: ...

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        """``{"loss", "output" (s cos logits), "leap_loss"[, "metric_l2_loss"]}``."""
        require_target(target, "LEAPTask")
        leap_loss, logits, embeddings = self.trainable_module(input, target)
        result = {"loss": leap_loss, "output": logits, "leap_loss": leap_loss}
        if self.metric_l2 is not None:
            reg = self.metric_l2(embeddings, self.head.weight, target)  # rows labelled -1 left out
            result["metric_l2_loss"] = reg
            result["loss"] = leap_loss + reg
        return result


# ====================================================================== FTL
def create_ftl_model(
    model_name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    classifier: str = "leap",
    embedding_size: Optional[int] = None,
    filter_hidden: Optional[int] = None,
    filter: str = "mlp",
    decoder_shape: Optional[Sequence[int]] = None,
    decoder_channels: Sequence[int] = (256, 192, 128, 64),
    alpha_sfmx: float = 1.0,
    alpha_recon: Optional[float] = None,
    alpha_reg: Optional[float] = None,
    recon_reduction: str = DEFAULT_RECON_REDUCTION,
    transfer_kwargs: Optional[Dict[str, Any]] = None,
    head_weight_decay: bool = True,
    **head_kwargs: Unpack[HeadOptions],
) -> FTLModel:
    """An :class:`FTLModel` (FTL Fig. 2) around ``timm.create_model(model_name, num_classes=0)``.

    ``Enc`` is the timm backbone (``g`` has ``num_features`` dims); ``R`` is
    :func:`~feature_cloud.ftl.make_filter` to ``embedding_size`` (default ``num_features``;
    ``filter="residual"``: ``f = g + R(g)``, starting at ``f = g``);
    ``FC`` is a :class:`LEAPMarginHead` (``classifier="leap"``, ``head_kwargs`` go to it; m-L2
    off by default, ``alpha_reg=0``) or the paper's ``nn.Linear`` (``"linear"``, ``alpha_reg``
    default 0.25); ``Dec`` is a :class:`~feature_cloud.ftl.ConvDecoder` to ``decoder_shape``
    (``(C, H, W)`` of the input; ``None``: no reconstruction, ``alpha_recon`` default 0, else 1);
    ``recon_reduction`` as :class:`FTLModel`'s (``"mean"``: Eq. 1 per element, the default;
    ``"paper"``: Eq. 1 summed over each image, the paper's balance with ``alpha_recon=1``).
    The defaults are not the paper's FTL (a LEAP head, no m-L2, no decoder); the paper's:
    ``classifier="linear", decoder_shape=(3, H, W), recon_reduction="paper"`` (README, "FTL in
    timm").
    ``transfer_kwargs`` go to :class:`FeatureTransfer` (``energy``, ``num_components``,
    ``tail_threshold``, ``class_counts``, ...). ``class_counts`` and ``tail_threshold`` (the
    training set's images per class, the long-tail bound) given once, with the head's keywords
    or in ``transfer_kwargs``, reach both the LEAP head and ``FeatureTransfer`` (with
    ``classifier="linear"``, ``FeatureTransfer``). ``head_weight_decay=False``: ``FC``'s weight
    in ``no_weight_decay()`` (:class:`TimmFTLModel`).
    ``pretrained`` and ``model_kwargs`` (a dict of further keywords) go to
    ``timm.create_model``; ``filter_hidden``: ``R``'s hidden width
    (:func:`~feature_cloud.ftl.make_filter`'s ``hidden``; default: twice the embedding size);
    ``decoder_channels``: :class:`~feature_cloud.ftl.ConvDecoder`'s ``channels``;
    ``alpha_sfmx``: the classification loss's weight in Eq. 4.
    """
    if classifier not in ("leap", "linear"):
        raise ValueError(f"classifier must be 'leap' or 'linear', got {classifier!r}")
    # before the backbone is built (seconds, and draws of the global RNG a refusal kept)
    recon_reduction = FC.check_recon_reduction(recon_reduction)
    num_classes = as_int(num_classes, "num_classes", 1)  # int() truncated 6.7
    transfer_kwargs = _share_training_set(classifier, head_kwargs, transfer_kwargs)
    if classifier == "linear" and head_kwargs:
        raise TypeError(
            f"classifier='linear' takes no LEAPMarginHead arguments, got {sorted(head_kwargs)}"
        )
    backbone = _headless_backbone(model_name, pretrained, model_kwargs)
    feat = int(backbone.num_features)
    emb = int(embedding_size) if embedding_size is not None else feat
    if filter == "residual" and emb != feat:
        raise ValueError(
            f"filter='residual' maps g to f of the same size: embedding_size={emb} differs from "
            f"{model_name}'s num_features={feat} (leave embedding_size=None, or use filter='mlp')"
        )
    if classifier == "leap":
        try:
            fc: nn.Module = LEAPMarginHead(emb, num_classes, **head_kwargs)
        except (TypeError, ValueError) as error:  # say which part of FTL refused
            raise type(error)(
                "FTL's FC (classifier='leap': a LEAPMarginHead, with the feature cloud unless "
                f"cloud=None): {error}"
            ) from error
    else:
        fc = nn.Linear(emb, num_classes, bias=False)
    decoder = (
        ConvDecoder(feat, out_shape=decoder_shape, channels=decoder_channels)
        if decoder_shape is not None
        else None
    )
    if alpha_recon is None:
        alpha_recon = 1.0 if decoder is not None else 0.0
    if alpha_reg is None:
        alpha_reg = 0.0 if classifier == "leap" else 0.25
    model = TimmFTLModel(
        backbone,
        fc,
        feature_dim=feat,
        filter_net=make_filter(
            feat,
            emb,
            int(filter_hidden) if filter_hidden is not None else 2 * emb,
            form=filter,
        ),
        decoder=decoder,
        alpha_sfmx=alpha_sfmx,
        alpha_recon=alpha_recon,
        alpha_reg=alpha_reg,
        recon_reduction=recon_reduction,
        transfer=FeatureTransfer(feat, num_classes, **transfer_kwargs),
    )
    model.head_weight_decay = as_bool(head_weight_decay, "head_weight_decay")
    return model


#: settings of the training set that FTL's FC (a LEAP head: its cloud) and FeatureTransfer (the
#: long-tail split) both read: given once, to either, they reach both
_TRAINING_SET_KWARGS = ("class_counts", "tail_threshold")


def _share_training_set(
    classifier: str, head_kwargs: Dict[str, Any], transfer_kwargs: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """:data:`_TRAINING_SET_KWARGS` given to one of the LEAP head (``head_kwargs``, changed in
    place; a linear FC takes none) and ``FeatureTransfer`` (returned: a copy of
    ``transfer_kwargs``) also go to the other; ``None`` is not given. Counts given to both must
    be the same (they are the training set's ``K_i``); a ``tail_threshold`` given to both may
    differ (the cloud's ``T`` and FTL's split, each set on purpose)."""
    transfer = dict(transfer_kwargs or {})
    for name in _TRAINING_SET_KWARGS:
        head_value, transfer_value = head_kwargs.pop(name, None), transfer.get(name)
        if head_value is not None and transfer_value is not None:
            if name == "class_counts" and not _same_counts(head_value, transfer_value):
                raise ValueError(
                    "class_counts (the FC head's) and transfer_kwargs['class_counts'] differ: both "
                    "are the training set's images per class; give them once (they reach both)"
                )
        elif head_value is not None or transfer_value is not None:
            transfer[name] = transfer_value if transfer_value is not None else head_value
        value = head_value if head_value is not None else transfer.get(name)
        if classifier == "leap" and value is not None:
            head_kwargs[name] = value
    return transfer


def _same_counts(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            a, b = dict(a), dict(b)
            return {k: v for k, v in a.items() if v} == {k: v for k, v in b.items() if v}
        if isinstance(a, Mapping):  # Counter(dataset.targets): laid out as the other's length
            a = class_counts_from_mapping(a, len(b))
        if isinstance(b, Mapping):
            b = class_counts_from_mapping(b, len(a))
        return torch.equal(torch.as_tensor(a).long().cpu(), torch.as_tensor(b).long().cpu())
    except (TypeError, ValueError, RuntimeError):
        return False


class TimmFTLModel(_BackboneOptimizerHooks, FTLModel):
    """:class:`feature_cloud.FTLModel` whose ``Enc`` is a timm model (what
    :func:`create_ftl_model` builds): ``no_weight_decay()`` / ``group_matcher()`` are the
    encoder's (``encoder.*``), ``R``, ``FC`` and ``Dec`` in its last layer group, for timm's
    ``create_optimizer_v2``. Otherwise an ``FTLModel`` (same state, same loss)."""

    def _timm_backbone(self) -> nn.Module:
        return self.encoder

    def _classifier(self) -> nn.Module:
        return self.classifier

    def encode(self, x: Tensor) -> Tensor:
        """``g = Enc(x)``; an encoder given a classifier again is refused before it runs."""
        self._refuse_backbone_classifier()
        return super().encode(x)

    def forward_features(self, input: Tensor) -> Tensor:
        """timm's model method: the encoder's unpooled features."""
        self._refuse_backbone_classifier()
        return self.encoder.forward_features(input)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's model method on :meth:`forward_features`' output: the identity feature
        ``f = R(g)`` (``pre_logits=True``; what ``forward(input)`` returns) or the classifier's
        logits of ``f`` (:meth:`logits`)."""
        self._refuse_backbone_classifier()
        g = check_encoded(
            self.encoder.forward_head(x, pre_logits=True),
            self.feature_dim,
            "the encoder's pooled features must be",
        )
        f = self.embed(g)
        return f if pre_logits else self.logits(f)


def _own_encode(model: FTLModel) -> bool:
    """Whether ``model``'s class encodes with its own ``encode`` (a user's subclass: pooling a
    feature-map encoder, normalising ``g``), not :class:`FTLModel`'s or :class:`TimmFTLModel`'s,
    whose checks :class:`FTLEmbedding` runs itself. A ``torch.compile``'d model: its original's
    class."""
    cls = type(getattr(model, "_orig_mod", model))
    return getattr(cls, "encode", None) not in (FTLModel.encode, TimmFTLModel.encode)


#: the parts of an FTLModel that FTLEmbedding holds itself or never encodes with
_NOT_ENCODING = ("encoder", "filter", "classifier", "decoder", "metric_l2", "feature_transfer")


def _encoding_extras(model: FTLModel) -> Dict[str, nn.Module]:
    """The child modules of a model with its own ``encode`` other than FTL's parts (a neck, a
    pooling layer with weights): what that ``encode`` may use beside ``Enc``."""
    inner = cast(nn.Module, getattr(model, "_orig_mod", model))
    return {n: m for n, m in inner.named_children() if n not in _NOT_ENCODING}


class FTLEmbedding(nn.Module):
    """The eval model of :class:`FTLTask`: the identity feature ``f = R(Enc(x))``.

    Shares ``Enc`` and ``R`` with the :class:`FTLModel` (its ``state_dict`` has ``encoder.*`` and
    ``filter.*``); ``train()`` keeps the model's frozen parts in eval mode. ``Enc(x)`` is checked
    as :meth:`FTLModel.encode` (and :meth:`TimmFTLModel.encode`: a timm encoder given a
    classifier again is refused) does; a model whose class has its own ``encode`` is encoded
    by it (:func:`_own_encode`).

    Pickled whole (``torch.save``) or copied (``copy.deepcopy``), it holds ``Enc`` and ``R`` only
    (not ``FC``, ``Dec`` or the transfer statistics) and the parts frozen at that time: the copy
    no longer follows the training model. A model with its own ``encode`` goes along (a copy
    of it), so that the copy encodes as the model does; that model's other child modules (a
    neck its ``encode`` uses; not ``FC``, ``Dec``) are submodules of the eval model under their
    names: saved, averaged by an EMA, moved and switched to eval mode with it.
    """

    def __init__(self, model: FTLModel) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.filter = model.filter
        self.feature_dim = model.feature_dim
        #: TimmFTLModel's check: a timm encoder given a classifier again is refused
        self.timm_encoder = isinstance(model, _BackboneOptimizerHooks)
        self._frozen_parts: Tuple[str, ...] = tuple(model.frozen)
        # the live model (its frozen parts), not a submodule; neither pickled nor copied (see
        # __getstate__). s55 deploy 3: a lambda and the model's bound encode stored here made
        # torch.save fail, and a deepcopy dragged the whole model along
        self.__dict__["_model"] = model
        if _own_encode(model):
            # s56 review: the other parts its encode may use (a neck) are this module's too,
            # shared: in its state_dict (a checkpoint, an EMA), moved by .to(), set by .train()
            for name, part in _encoding_extras(model).items():
                if hasattr(self, name):
                    raise ValueError(
                        f"{type(model).__name__}.{name}: FTLEmbedding has an attribute of that "
                        "name; rename the model's part that its encode uses"
                    )
                self.add_module(name, part)

    @property
    def frozen(self) -> Tuple[str, ...]:
        """The model's frozen parts (those at pickling / copying time for a copy)."""
        model = self.__dict__.get("_model")
        return tuple(model.frozen) if model is not None else self._frozen_parts

    def __getstate__(self) -> Dict[str, Any]:
        # nn.Module's: without a compile()'d call (bound to this module, not to a copy)
        state = cast(Dict[str, Any], super().__getstate__())
        model = state.get("_model")
        if model is not None and not _own_encode(model):
            del state["_model"]
            state["_frozen_parts"] = tuple(model.frozen)
        return state

    def encode(self, x: Tensor) -> Tensor:
        """``g = Enc(x)`` ``(B, feature_dim)``, checked as :meth:`TimmFTLModel.encode`; the
        model's own ``encode`` where its class has one."""
        model = self.__dict__.get("_model")
        if model is not None and _own_encode(model):
            return cast(Tensor, model.encode(x))
        if self.timm_encoder:
            _refuse_backbone_classifier(self, self.encoder)
        return check_encoded(self.encoder(x), self.feature_dim)

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, x: Tensor) -> Tensor: ...

    def forward(self, x: Tensor) -> Tensor:
        return self.filter(self.encode(x))

    def train(self, mode: bool = True) -> FTLEmbedding:
        super().train(mode)
        for name in self.frozen:
            if name in ("encoder", "filter"):
                getattr(self, name).eval()
        return self


class FTLTask(_AllOrNothingLoad):
    """FTL (Yin et al. 2019) as a timm training task: an :class:`FTLModel` around a timm backbone,
    trained with Algorithm 1 by the task's :class:`AlternatingScheduler`.

    ``forward(input, target)`` in stages 0 and 2 returns Eq. 4 (:meth:`FTLModel.loss`):
    ``{"loss", "sfmx_loss", "recon_loss", "reg_loss"}``. Stage 1 needs the long-tail batch as
    well: ``forward(hard_x, hard_y, tail_x, tail_y)`` returns the ``R``/``FC`` loss of the hard,
    long-tail and transferred batches (:meth:`AlternatingScheduler.stage1_loss`):
    ``{"loss", "sfmx_loss", "reg_loss"}``. There is no ``"output"``: :meth:`FTLModel.loss` does
    not expose the logits (the evaluator computes them from the eval model's ``f``).

    The loop drives the schedule (see the FTL README): :meth:`update_stats` when
    :attr:`needs_stats`, :meth:`loaders` for the current stage's batches, :meth:`step` after each
    optimiser step. Freezing (``requires_grad=False``, ``.grad=None``, eval mode) makes
    ``torch.optim`` skip the frozen parts: build one optimiser over
    ``task.get_trainable_module().param_groups()``.

    Checkpoints (timm layout): the **eval model** is :class:`FTLEmbedding` (``Enc`` + ``R``:
    ``f`` for retrieval); **task state** is ``{"classifier", "decoder", "feature_transfer",
    "scheduler"}`` (FC, Dec, ``C``/``Q``/``h``, the position in Algorithm 1).

    Args:
        model: the :class:`FTLModel` (e.g. from :func:`create_ftl_model`).
        stage0_iters, stage_iters, stage2_iters, max_alternations, seed, flip, quality,
            tail_sampling: the :class:`AlternatingScheduler`'s (``tail_sampling="classes"``: every
            long-tail class equally often in stage 1's long-tail batch; default ``"samples"``;
            ``seed=None``: drawn from torch's global RNG, saved in the task state).
        device, dtype, verbose: as in ``timm.task.TrainingTask``; the model stays where it is
            (as timm's ``ClassificationTask`` leaves it) unless ``device`` is given, then it is
            moved there.
    """

    def __init__(
        self,
        model: FTLModel,
        *,
        stage0_iters: int,
        stage_iters: int = 5000,
        stage2_iters: Optional[int] = None,
        max_alternations: Optional[int] = None,
        seed: Optional[int] = None,
        flip: Optional[Callable[[Tensor], Tensor]] = None,
        quality: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        tail_sampling: str = DEFAULT_TAIL_SAMPLING,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        if not isinstance(model, FTLModel):
            raise TypeError(f"model must be a feature_cloud.FTLModel, got {type(model).__name__}")
        check_update_stats_callables(flip, quality)  # before the model moves
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = _placed(model, device)
        self.scheduler = AlternatingScheduler(
            model,
            stage0_iters=stage0_iters,
            stage_iters=stage_iters,
            stage2_iters=stage2_iters,
            max_alternations=max_alternations,
            seed=seed,
            flip=flip,
            quality=quality,
            tail_sampling=tail_sampling,
        )
        self._defer_freeze()

    def _defer_freeze(self) -> None:
        """Unfreeze the parts the current stage keeps fixed until the first training computation
        (:meth:`FTLModel.defer_freeze`): timm's ``create_optimizer_v2`` leaves out parameters
        with ``requires_grad=False``, so an optimiser built after a task that starts in stage 1
        (``stage0_iters=0``, or a resume) never trained ``Enc`` in stage 2."""
        self._parts().defer_freeze()

    @classmethod
    def from_timm(
        cls,
        model_name: str,
        num_classes: int,
        *,
        stage0_iters: int,
        stage_iters: int = 5000,
        stage2_iters: Optional[int] = None,
        max_alternations: Optional[int] = None,
        seed: Optional[int] = None,
        flip: Optional[Callable[[Tensor], Tensor]] = None,
        quality: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        tail_sampling: str = DEFAULT_TAIL_SAMPLING,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        **ftl_kwargs: Any,  # not a TypedDict: the head's seed would overlap the task's
    ) -> FTLTask:
        """:func:`create_ftl_model` wrapped in the task: ``ftl_kwargs`` are its keywords
        (``classifier``, ``embedding_size``, ``decoder_shape``, the head's, ``model_kwargs`` for
        ``timm.create_model``, ...); the others are :class:`FTLTask`'s."""
        check_update_stats_callables(flip, quality)  # before the model is built (global RNG)
        model = create_ftl_model(model_name, num_classes, **ftl_kwargs)
        return cls(
            model,
            stage0_iters=stage0_iters,
            stage_iters=stage_iters,
            stage2_iters=stage2_iters,
            max_alternations=max_alternations,
            seed=seed,
            flip=flip,
            quality=quality,
            tail_sampling=tail_sampling,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    # ------------------------------------------------------------------ parts
    def _parts(self, module: Optional[nn.Module] = None) -> FTLModel:
        outer = module if module is not None else self.get_trainable_module()
        current = outer
        while not isinstance(current, FTLModel):
            if current is None:
                raise TypeError(f"cannot find the FTLModel inside {type(outer).__name__}")
            current = _wrapped(current)
        return current

    @property
    def model(self) -> FTLModel:
        """The :class:`FTLModel`."""
        return self._parts()

    # ------------------------------------------------------------------ Algorithm 1
    @property
    def stage(self) -> int:
        """The stage of the next iteration (0, 1 or 2)."""
        return self.scheduler.stage

    @property
    def needs_stats(self) -> bool:
        """Whether stage 1 is about to start without UpdateStats: call :meth:`update_stats`."""
        return self.scheduler.needs_stats

    @property
    def finished(self) -> bool:
        return self.scheduler.finished

    def update_stats(self, loader: Iterable[Any]) -> Dict[str, Any]:
        """UpdateStats() of Algorithm 1 (:meth:`AlternatingScheduler.update_stats`); its summary
        is logged (``verbose``, logger ``feature_cloud.integrations.timm``)."""
        summary = self.scheduler.update_stats(loader)
        if self.verbose:
            _logger.info("FTL UpdateStats: %s", summary)
        return summary

    def loaders(
        self, dataset: Any, batch_size: int, **loader_kwargs: Any
    ) -> Union[DataLoader[Any], Tuple[DataLoader[Any], DataLoader[Any]]]:
        """The current stage's ``DataLoader``\\ s (:meth:`AlternatingScheduler.loaders`: the pair
        in stage 1, typed as either; ``isinstance(loaders, tuple)`` narrows it)."""
        return self.scheduler.loaders(dataset, batch_size, **loader_kwargs)

    def step(self) -> int:
        """Count one finished iteration (after ``optimizer.step()``); returns the next stage. A
        stage switch is logged (``verbose``), as fastreid's hook logs ``ftl_stage``."""
        before = self.scheduler.stage
        stage = self.scheduler.step()
        if self.verbose and (stage != before or self.scheduler.finished):
            _logger.info(
                "FTL: stage %d -> %s (%s)",
                before,
                "finished" if self.scheduler.finished else stage,
                self.scheduler,
            )
        return stage

    # ------------------------------------------------------------------ timm task hooks
    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> FTLTask:
        raise NotImplementedError(
            "FTLTask is single-process: its data-parallel path is not tested through timm (DDP "
            "would need find_unused_parameters=True for the stages' frozen parts); the core "
            "AlternatingScheduler runs data parallel (README, 'FTL: Usage')"
        )

    def setup_ema(
        self,
        decay: float = 0.9999,
        use_warmup: bool = False,
        device: Optional[torch.device] = None,
        **kwargs: Any,
    ) -> ModelEmaV3Following:
        """timm's EMA of the :class:`FTLModel` (:class:`ModelEmaV3Following`: weights and
        BatchNorm statistics averaged; the FC's class statistics and the FTL statistics, basis
        and sample lists, which change shape at every UpdateStats, copied from the live model).
        ``task.update_ema()`` or ``ema.update(task.model)`` after each optimiser step; the EMA
        eval model is :class:`FTLEmbedding` of the copy; ``create_evaluator(ema=True)`` scores it
        with the copy's ``FC``."""
        _forget_compiled_ema(self)
        self.trainable_module_ema = ModelEmaV3Following(
            self._parts(),
            decay=decay,
            use_warmup=use_warmup,
            device=device,
            **kwargs,
        )
        return self.trainable_module_ema

    @overload
    def get_eval_model(
        self, module: Optional[nn.Module] = ..., ema: Literal[False] = ...
    ) -> nn.Module: ...

    @overload
    def get_eval_model(
        self, module: Optional[nn.Module] = ..., ema: bool = ...
    ) -> Optional[nn.Module]: ...

    def get_eval_model(
        self, module: Optional[nn.Module] = None, ema: bool = False
    ) -> Optional[nn.Module]:
        """:class:`FTLEmbedding`: ``f = R(Enc(x))`` (of the EMA copy with ``ema=True``; the
        compiled one after ``compile_ema()``). An encoder given a classifier again (or reset to
        ``global_pool=''``) is refused here and when the eval model runs."""
        checked = module if module is not None else self.get_trainable_module(ema=ema)
        parts = self._parts(checked) if checked is not None else None
        if isinstance(parts, TimmFTLModel):
            parts._refuse_backbone_classifier()
        if module is None:
            compiled = _compiled_eval_model(self, ema)
            if compiled is not None:
                return compiled
            if ema:
                module = self.get_trainable_module(ema=True)
                if module is None:
                    return None
        return FTLEmbedding(self._parts(module))

    def compile(
        self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any
    ) -> nn.Module:
        """Compile ``Enc`` in place (``nn.Module.compile``: parameter names, checkpoints and the
        parts' freezing are unchanged; ``R``, ``FC``, ``Dec`` and the transfer stay eager);
        returns the eval model (:class:`FTLEmbedding`, its ``Enc`` compiled)."""
        parts = self._parts()
        parts.encoder.compile(backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = FTLEmbedding(parts)
        return self.eval_model

    def get_task_state(
        self, module: Optional[nn.Module] = None, ema: bool = False
    ) -> Dict[str, Any]:
        """``{"classifier", "decoder", "feature_transfer", "scheduler"}`` state dicts (the EMA
        copy's, without the shared scheduler, with ``ema=True``)."""
        if module is None and ema:
            module = self.get_trainable_module(ema=True)
            if module is None:
                return {}
        parts = self._parts(module)
        state = {
            "classifier": parts.classifier.state_dict(),
            "decoder": parts.decoder.state_dict() if parts.decoder is not None else {},
            "feature_transfer": parts.feature_transfer.state_dict(),
        }
        if not ema:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _restoring(self, modules: Sequence[nn.Module]) -> ContextManager[None]:
        """The schedule too: a schedule or statistics that are refused leave the weights and
        the schedule as they were."""
        return self.scheduler.restoring(*modules)

    def load_task_state(
        self,
        state: Optional[Dict[str, Any]],
        strict: bool = True,
        module: Optional[nn.Module] = None,
        ema: bool = False,
    ) -> None:
        if not _has_task_state(state, strict, "FTL"):
            return
        missing = {"classifier", "decoder", "feature_transfer"} | (set() if ema else {"scheduler"})
        missing -= set(state)
        if missing:
            raise KeyError(f"FTL task state lacks {sorted(missing)}")
        if module is None and ema:
            module = self._ema_module()
        parts = self._parts(module)
        if parts.decoder is None and state["decoder"] and strict:
            raise RuntimeError("the checkpoint has a decoder but this FTLModel has none")
        loaded = [
            m for m in (parts.decoder, parts.classifier, parts.feature_transfer) if m is not None
        ]
        with self.scheduler.restoring(*loaded):  # all or nothing
            if not ema:
                self.scheduler.load_state_dict(state["scheduler"])  # checks the settings first
            if parts.decoder is not None:
                parts.decoder.load_state_dict(state["decoder"], strict=strict)
            parts.classifier.load_state_dict(state["classifier"], strict=strict)
            parts.feature_transfer.load_state_dict(state["feature_transfer"], strict=strict)
        if not ema:
            self._defer_freeze()  # an optimiser built after the resume sees every part

    def _ema_module(self) -> nn.Module:
        module = self.get_trainable_module(ema=True)
        if module is None:
            raise RuntimeError("the EMA module does not exist yet: call setup_ema() first")
        return module

    def create_evaluator(self, ema: bool = False, **kwargs: Any) -> LEAPEvaluator:
        """timm's top-1/top-5 on ``FC(f)`` logits (``s cos`` for a margin head); ``ema=True``:
        the EMA copy's ``FC``, to score ``get_eval_model(ema=True)``."""
        model = self._parts(self._ema_module() if ema else None)
        return LEAPEvaluator(model, device=self.device, **kwargs)

    def get_clip_parameters(self, exclude_head: bool = False):
        parts = self._parts()
        if exclude_head:
            head = {id(p) for p in parts.classifier.parameters()}
            return [p for p in parts.parameters() if id(p) not in head]
        return parts.parameters()

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(
            self,
            input: Tensor,
            target: Tensor,
            tail_input: Optional[Tensor] = None,
            tail_target: Optional[Tensor] = None,
        ) -> Dict[str, Tensor]: ...

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        tail_input: Optional[Tensor] = None,
        tail_target: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Eq. 4 on ``(input, target)`` in stages 0 and 2; in stage 1 the loss of the hard batch
        ``(input, target)``, the long-tail batch ``(tail_input, tail_target)`` and their
        transferred batch (Eq. 6)."""
        require_target(target, "FTLTask")
        refuse_soft_target(target, "FTLTask")
        refuse_soft_target(tail_target, "FTLTask")
        has_tail = tail_input is not None or tail_target is not None
        if self.scheduler.stage == 1 and (self.training or has_tail):
            if tail_input is None or tail_target is None:
                raise ValueError(
                    "stage 1 of Algorithm 1 needs the long-tail batch: task(hard_x, hard_y, tail_x, tail_y) "
                    "with the batches of task.loaders(...)"
                )
            out = self.scheduler.stage1_loss((input, target), (tail_input, tail_target))
            return {"loss": out["loss"], "sfmx_loss": out["sfmx"], "reg_loss": out["reg"]}
        if has_tail:
            raise ValueError(
                f"a long-tail batch is only used in stage 1; the task is in stage {self.scheduler.stage}"
            )
        out = self._parts().loss(input, target)  # in eval mode (validation): Eq. 4, any stage
        return {
            "loss": out["loss"],
            "sfmx_loss": out["sfmx"],
            "recon_loss": out["recon"],
            "reg_loss": out["reg"],
        }
