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
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.task import ClassificationEvaluator, TrainingTask
from timm.utils.model import unwrap_model
from torch import Tensor, nn

from feature_cloud.heads import LEAPMarginHead
from feature_cloud.regularizers import MetricL2

__all__ = ["LEAPTask", "LEAPTrainableModule", "LEAPEvaluator", "create_backbone_and_head"]


def create_backbone_and_head(
    model_name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **head_kwargs: Any,
) -> Tuple[nn.Module, LEAPMarginHead]:
    """``timm.create_model(model_name, num_classes=0)`` and a matching :class:`LEAPMarginHead`.

    The backbone outputs pooled embeddings of size ``num_features``; ``head_kwargs`` go to
    :class:`LEAPMarginHead` (``margin_type``, ``scale``, ``margin``, ``cloud``,
    ``class_counts``, ``warmup_steps``, ...).
    """
    backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
    head = LEAPMarginHead(int(backbone.num_features), int(num_classes), **head_kwargs)
    return backbone, head


class LEAPTrainableModule(nn.Module):
    """Backbone + head in one Module (what DDP wraps and what EMA copies).

    ``forward(input, target)`` returns ``(loss, logits, embeddings)``; ``forward(input)`` returns
    the plain ``s cos(theta)`` logits.
    """

    def __init__(self, backbone: nn.Module, head: LEAPMarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input: Tensor, target: Optional[Tensor] = None):
        embeddings = self.backbone(input)
        if target is None:
            return self.head.logits(embeddings)
        loss = self.head(embeddings, target)
        with torch.no_grad():
            logits = self.head.logits(embeddings)
        return loss, logits, embeddings


class LEAPEvaluator(ClassificationEvaluator):
    """timm's classification evaluator on the head's cosine logits of the eval model's embeddings."""

    def __init__(self, head: LEAPMarginHead, device=None, **kwargs: Any) -> None:
        super().__init__(device=device, **kwargs)
        self.head = head

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor):
        return super().update(self.head.logits(output), target)


class LEAPTask(TrainingTask):
    """Metric-learning training task: timm backbone -> embeddings -> LEAP margin loss.

    Args:
        model: a timm model created with ``num_classes=0`` (outputs ``(B, D)`` embeddings).
        head: the :class:`LEAPMarginHead` (``embedding_size`` must equal ``model.num_features``).
        metric_l2: optional ``alpha`` of the m-L2 regulariser (FTL Eq. 3) added to the loss.
        device, dtype, verbose: as in ``timm.task.TrainingTask``.
    """

    def __init__(
        self,
        model: nn.Module,
        head: LEAPMarginHead,
        metric_l2: Optional[float] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(head, LEAPMarginHead):
            raise TypeError(f"head must be a feature_cloud.LEAPMarginHead, got {type(head).__name__}")
        features = getattr(unwrap_model(model), "num_features", None)
        if features is not None and int(features) != head.embedding_size:
            raise ValueError(
                f"the backbone outputs num_features={features} but the head expects "
                f"embedding_size={head.embedding_size}"
            )
        self.trainable_module = LEAPTrainableModule(model, head).to(device=self.device)
        self.metric_l2 = MetricL2(float(metric_l2)) if metric_l2 is not None else None

    @classmethod
    def from_timm(
        cls,
        model_name: str,
        num_classes: int,
        *,
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        metric_l2: Optional[float] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        **head_kwargs: Any,
    ) -> "LEAPTask":
        """Build the backbone and head with :func:`create_backbone_and_head` and wrap them."""
        backbone, head = create_backbone_and_head(
            model_name, num_classes, pretrained=pretrained, model_kwargs=model_kwargs, **head_kwargs
        )
        return cls(backbone, head, metric_l2=metric_l2, device=device, dtype=dtype, verbose=verbose)

    # ------------------------------------------------------------------ parts
    def _parts(self, module: Optional[nn.Module] = None, ema: bool = False) -> LEAPTrainableModule:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError("the EMA module does not exist yet: call setup_ema() first" if ema
                               else "the task has no trainable module")
        current = module
        while not isinstance(current, LEAPTrainableModule):
            if not hasattr(current, "module"):
                raise TypeError(f"cannot find the LEAP backbone/head inside {type(module).__name__}")
            current = current.module  # DDP, ModelEmaV3, compile wrappers
        return current

    @property
    def head(self) -> LEAPMarginHead:
        return self._parts().head

    @property
    def backbone(self) -> nn.Module:
        return self._parts().backbone

    # ------------------------------------------------------------------ timm task hooks
    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> "LEAPTask":
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any) -> nn.Module:
        """Compile the backbone (the head stays eager: it updates buffers with data-dependent indices)."""
        parts = self._parts()
        parts.backbone = torch.compile(parts.backbone, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = parts.backbone
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The backbone alone (embeddings); the head is task state."""
        if module is None and not ema and hasattr(self, "eval_model"):
            return self.eval_model
        try:
            return self._parts(module, ema).backbone
        except RuntimeError:
            return None

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """``{"head": LEAPMarginHead.state_dict()}``: class weights, statistics, step and RNG."""
        return {"head": self._parts(module, ema).head.state_dict()}

    def load_task_state(
        self,
        state: Optional[Dict[str, Any]],
        strict: bool = True,
        module: Optional[nn.Module] = None,
        ema: bool = False,
    ) -> None:
        if not state:
            if strict:
                raise RuntimeError("the checkpoint has no LEAP head task state ('task_state')")
            return
        if "head" not in state:
            raise KeyError(f"LEAP task state needs a 'head' entry, got keys {sorted(state)}")
        self._parts(module, ema).head.load_state_dict(state["head"], strict=strict)

    def create_evaluator(self, **kwargs: Any) -> LEAPEvaluator:
        return LEAPEvaluator(self.head, device=self.device, **kwargs)

    def get_clip_parameters(self, exclude_head: bool = False):
        parts = self._parts()
        if exclude_head:
            return parts.backbone.parameters()
        return parts.parameters()

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        """``{"loss", "output" (s cos logits), "leap_loss"[, "metric_l2_loss"]}``."""
        leap_loss, logits, embeddings = self.trainable_module(input, target)
        result = {"loss": leap_loss, "output": logits, "leap_loss": leap_loss}
        if self.metric_l2 is not None:
            reg = self.metric_l2(embeddings, self.head.weight)
            result["metric_l2_loss"] = reg
            result["loss"] = leap_loss + reg
        return result
