"""Process-group helpers: synchronised class statistics and a class-sharded LEAP head.

Everything here runs on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); there is no
communication layer of its own. Without an initialised process group every helper degrades to
the single-process behaviour, so the same training script runs with and without ``torchrun``.

Synchronised statistics (:class:`SyncedClassStatistics`, :func:`synchronize`)
    LEAP's class centers (Eq. 4) and angle memory (Eq. 3, 5) are updated from the **global**
    batch: every rank all-gathers the detached ``(B, D)`` features and labels and applies the same
    update, so all ranks hold bit-identical statistics, equal to one process fed the concatenated
    batch (ranks in order). All-gather rather than an all-reduce of per-class sums and counts:

    * the angle memory stores one angle *per sample* (Eq. 3, 5), so per-class sums are not enough;
      an all-reduce scheme would need a second round for the angles anyway;
    * per-class sums cost ``O(C D)`` per step (a 10^5-class head moves ``C D`` floats each step),
      the gathered batch costs ``O(world_size B D)``, which is smaller whenever the global batch
      has fewer samples than there are classes, the long-tail case LEAP is for;
    * it reuses :meth:`ClassStatistics.update` unchanged, so the single-process semantics
      (EMA with in-batch means, ring-memory order) hold exactly.

    Ranks may pass different batch sizes, including empty ones: each rank pads its batch to a
    common size with ignored rows (label ``-1``), which the core skips.

Sharded classifier (:class:`ShardedLEAPMarginHead`)
    Model parallelism for very many classes (insightface's PartialFC is the reference): rank ``r``
    holds rows ``[start_r, end_r)`` of the ``(C, D)`` class weights. The embeddings of all ranks
    are all-gathered; each rank runs the fused margin loss (:func:`feature_cloud.fused.margin_loss`,
    LEAP Eq. 7-8) of the global batch against its own classes, and the softmax cross-entropy is
    assembled exactly from a distributed max, a distributed sum of ``exp`` and the target logit
    of the one shard that owns each label (Partial FC's scheme, inside the fused kernels).
"""

from __future__ import annotations

import math
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import Unpack  # torch's dependency (typing.Unpack: Python 3.11+)

from . import functional as FC
from . import fused, margins
from . import noise as N
from ._compat import disable_compile, is_compiling
from ._validation import (
    as_float,
    as_int,
    check_batch,
    check_embeddings,
    check_reduction,
    inference_problem,
    other_rank_message,
    refuse_bad_weights,
    trainable_labels,
)
from .cloud import (
    FeatureCloud,
    ShardedCloudOptions,
    WithFeatureCloud,
    migrate_state_dict,
    migrated_for_checking,
)
from .heads import (
    MarginSettings,
    _imprint_outside_the_graph,
    cloud_margin_logits,
    fused_cloud,
    hooked_weight,
    imprint_through_parametrization,
    imprint_weight,
    make_cloud,
    recomputed_weight,
    resolve_margin,
    scoring_weight,
)
from .sync import (  # noqa: F401  (re-exported: the process-group API lives here)
    BATCH_MODES,
    HoldsProcessGroup,
    ProcessGroup,
    SyncedClassStatistics,
    _pml_to_rank_order,
    _rank_world,
    _ReplicatedSum,
    agree_on_batch,
    collective_device,
    gather_batch,
    is_distributed,
    own_rows,
)

__all__ = [
    "BATCH_MODES",
    "is_distributed",
    "gather_batch",
    "agree_on_batch",
    "SyncedClassStatistics",
    "synchronize",
    "even_shard_sizes",
    "ShardedLEAPMarginHead",
    "consolidate_state_dicts",
    "split_state_dict",
]


#: the head :func:`synchronize` returns is the one it was given
HeadT = TypeVar("HeadT", bound=nn.Module)


def synchronize(
    head: HeadT,
    process_group: ProcessGroup = None,
    *,
    pad_to: Optional[int] = None,
    batch: str = "local",
) -> HeadT:
    """Make ``head`` update its LEAP statistics from the global batch of ``process_group``.

    Heads synchronise over the default group already (``sync="auto"``, the default of
    :class:`~feature_cloud.cloud.FeatureCloud`); call this for another ``process_group``,
    ``pad_to`` or ``batch="pml_gathered"``. Replaces the statistics of ``head.feature_cloud`` in
    place by a :class:`SyncedClassStatistics` holding the same state and returns ``head``. The
    cloud of each rank is then drawn from its own noise stream (the rank). The process group is
    looked up at every step, so the call may precede ``init_process_group``; without one the head
    behaves exactly as before.
    """
    cloud = getattr(head, "feature_cloud", None)
    if not isinstance(cloud, FeatureCloud):
        raise TypeError(
            f"synchronize expects a head holding a FeatureCloud (LEAPMarginHead, LEAPLoss), got "
            f"{type(head).__name__}"
        )
    if isinstance(head, ShardedLEAPMarginHead):
        raise TypeError(
            "ShardedLEAPMarginHead updates its statistics from the gathered batch "
            "already; synchronize() is for replicated heads"
        )
    cloud.synchronize(process_group, pad_to=pad_to, batch=batch)
    return head


# --------------------------------------------------------------------------------------------
# sharded classifier
# --------------------------------------------------------------------------------------------


def even_shard_sizes(num_classes: int, world_size: int) -> List[int]:
    """Rows per rank: ``num_classes // world_size``, the first ``num_classes % world_size`` ranks
    one more (like ``numpy.array_split``)."""
    if world_size < 1 or num_classes < world_size:
        raise ValueError(
            f"cannot shard num_classes={num_classes} over world_size={world_size} ranks "
            "(every rank needs at least one class)"
        )
    base, extra = divmod(num_classes, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def _check_sizes(sizes: Sequence[int], num_classes: int, world_size: int) -> List[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size or sum(sizes) != num_classes or min(sizes) < 1:
        raise ValueError(
            f"shard sizes {sizes} must be {world_size} positive numbers summing to "
            f"num_classes={num_classes}"
        )
    return sizes


class ShardedLEAPMarginHead(HoldsProcessGroup, WithFeatureCloud, MarginSettings, nn.Module):
    r"""LEAP margin softmax head whose ``(C, D)`` class weights are split over the ranks.

    Rank ``r`` of ``process_group`` holds ``weight`` rows ``[shard_start, shard_end)`` (sizes from
    :func:`even_shard_sizes` or ``shard_sizes``). ``forward(embeddings, labels)`` takes this rank's
    batch, all-gathers the batches of all ranks and returns the loss of the *global* batch, the
    same value on every rank and equal to :class:`~feature_cloud.heads.LEAPMarginHead` with the
    full weight on the concatenated batch:

    * margin logits of the global batch against the local classes, LEAP Eq. 1-2 / 7-8, by the
      fused kernels of :func:`~feature_cloud.fused.margin_loss` (the margin lands on the shard
      that owns the label; the others see ``label = -1``; a margin without a fused derivative
      uses :func:`~feature_cloud.heads.cloud_margin_logits`);
    * :math:`\ell_n = \log\sum_r\sum_{j\in r} e^{z_{nj}-m_n} + m_n - z_{ny_n}` with
      :math:`m_n` the all-reduced row maximum, the sum of exponentials all-reduced and the target
      logit taken from its owner shard.

    The :class:`~feature_cloud.cloud.FeatureCloud` (statistics: LEAP Eq. 3-5, step, seed) is
    replicated on every rank and updated from the gathered global batch (no second collective).
    The cloud is counter-based on the global class index and the global batch row, so each shard
    draws exactly its columns of the dense head's cloud: with no padding and ``sample_rate=1`` the
    sharded loss equals the dense head's on the concatenated batch, cloud included.

    Gradients: ``weight`` receives exactly the rows of the dense head's gradient; the embeddings
    receive the dense gradient of the global loss, times ``world_size`` when ``ddp_backbone`` (the
    default), because ``DistributedDataParallel`` averages the backbone's gradients over ranks
    (insightface's PartialFC does the same). Do not wrap this head in DDP: its parameters differ
    per rank.

    Args:
        embedding_size, num_classes, margin_type, scale, margin, cloud, reduction, validate:
            as :class:`~feature_cloud.heads.LEAPMarginHead` (``num_classes`` is the total ``C``;
            ``reduction="none"`` returns the losses of this rank's own samples; their backward
            all-gathers every rank's upstream gradient, so per-sample weights reach every shard:
            every rank must back-propagate).
        process_group: the group the classes are sharded over (default: WORLD). Without an
            initialised process group the head holds all classes on one process.
        shard_sizes: rows per rank (uneven splits allowed); default :func:`even_shard_sizes`.
        pad_to: per-rank batch size to pad to (see :func:`gather_batch`); ``None``: the
            maximum, found by the ranks' batch agreement (:func:`agree_on_batch`: one host sync
            per step, also with ``pad_to``); ``validate=False`` with ``pad_to`` skips that
            agreement (no sync; bad batches raise on their own rank only).
        ddp_backbone: scale the embeddings' gradient by ``world_size`` (see above).
        sample_rate: PartialFC-style negative-class sampling, an **approximation**, off at 1.0.
            In training each shard keeps every class that is a label in the global batch plus
            random negatives, ``k = min(C_r, max(ceil(sample_rate * C_r), B_global))`` classes in
            all (``k >= B_global`` so that no positive class is ever dropped, without a host sync);
            the softmax runs over the kept classes only and the other rows get no gradient.
        **cloud_options: the cloud's settings, as for :class:`~feature_cloud.heads.LEAPMarginHead`
            (``sync`` is fixed: the statistics see the gathered batch). Without ``seed`` rank 0
            draws one and broadcasts it.

    State (tensors only): ``weight`` (this shard's rows), ``shard_rank``, ``shard_sizes`` and the
    replicated ``feature_cloud.*`` (see :func:`consolidate_state_dicts`).
    """

    weight: Tensor
    shard_rank: Tensor
    shard_sizes: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin_type: Union[str, margins.Margin] = "cosface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
        cloud: Union[None, str, FeatureCloud] = "full",
        *,
        reduction: str = "mean",
        validate: bool = True,
        process_group: ProcessGroup = None,
        shard_sizes: Optional[Sequence[int]] = None,
        pad_to: Optional[int] = None,
        ddp_backbone: bool = True,
        sample_rate: float = 1.0,
        **cloud_options: Unpack[ShardedCloudOptions],
    ) -> None:
        super().__init__()
        embedding_size = as_int(embedding_size, "embedding_size", 1)
        num_classes = as_int(num_classes, "num_classes", 1)
        rule, scale, margin = resolve_margin(margin_type, scale, margin, num_classes)
        if rule.sub_centers != 1:
            raise ValueError(
                f"margin_type {rule.name!r} uses sub-centers, which the sharded "
                "head does not support; use LEAPMarginHead"
            )
        self.margin_rule, self._scale, self._margin = rule, scale, margin
        check_reduction(reduction)
        sample_rate = as_float(
            sample_rate, "sample_rate", minimum=0.0, maximum=1.0, min_inclusive=False
        )
        if pad_to is not None:
            pad_to = as_int(pad_to, "pad_to", 0)
        if "sync" in cloud_options:
            raise TypeError(
                "ShardedLEAPMarginHead has no sync option: its statistics are updated "
                "from the gathered global batch"
            )
        rank, world = _rank_world(process_group)
        num_classes = int(num_classes)
        sizes = (
            _check_sizes(shard_sizes, num_classes, world)
            if shard_sizes is not None
            else even_shard_sizes(num_classes, world)
        )
        if not isinstance(cloud, FeatureCloud):
            if cloud_options.get("seed") is None:  # one seed for all ranks
                cloud_options["seed"] = _broadcast_seed(process_group)
            cloud_options["sync"] = "off"
        self.embedding_size = int(embedding_size)
        self.num_classes = num_classes
        self.feature_cloud = make_cloud(
            cloud, num_classes, self.embedding_size, cloud_options, replicated=True
        )
        self.reduction = reduction
        self.validate = validate  # checked (as_bool): bool("no") validated
        self.process_group = process_group
        self.rank, self.world_size = rank, world
        self.sizes = sizes
        self.shard_start = sum(sizes[:rank])
        self.shard_end = self.shard_start + sizes[rank]
        self.pad_to = None if pad_to is None else int(pad_to)
        self.ddp_backbone = bool(ddp_backbone)
        self.sample_rate = float(sample_rate)
        self.weight = nn.Parameter(torch.empty(sizes[rank], self.embedding_size))
        self.register_buffer("shard_rank", torch.tensor(rank, dtype=torch.long))
        self.register_buffer("shard_sizes", torch.tensor(sizes, dtype=torch.long))
        self._init_weight()

    def _init_weight(self) -> None:
        # rows drawn like the dense head's xavier_normal_ init of the full (C, D) matrix
        std = math.sqrt(2.0 / (self.num_classes + self.embedding_size))
        nn.init.normal_(self.weight, 0.0, std)

    def reset_parameters(self) -> None:
        """Fresh weights (as at construction), shard layout and cloud
        (:meth:`FeatureCloud.reset_parameters`): the re-initialisation of a head built on the
        ``meta`` device and moved by ``to_empty``."""
        self._init_weight()
        self.shard_rank.fill_(self.rank)
        self.shard_sizes.copy_(torch.tensor(self.sizes, dtype=torch.long))
        self.feature_cloud.reset_parameters()

    # ------------------------------------------------------------------ public API
    def shard_logits(self, embeddings: Tensor) -> Tensor:
        """Inference ``s cos(theta)`` of ``embeddings`` against this rank's classes,
        ``(B, shard_end - shard_start)``, columns ``shard_start..shard_end-1`` (no communication):
        the columns of :meth:`LEAPMarginHead.logits <feature_cloud.heads.LEAPMarginHead.logits>`
        of the consolidated head (in eval mode against this shard's rows of the cloud's
        prototypes; in train mode, or with ``prototype_shrinkage=None``, against the weights)."""
        check_embeddings(embeddings, self.embedding_size)
        weight, unit = scoring_weight(  # the weight as forward sees it (prune, weight_norm)
            self.feature_cloud, hooked_weight(self), class_start=self.shard_start
        )
        return FC.cosine_logits(embeddings, weight, unit_weight=unit) * self.scale

    def logits(self, embeddings: Tensor) -> Tensor:
        """All classes' inference logits ``(B_r, C)`` of this rank's ``embeddings``, equal to the
        consolidated :class:`~feature_cloud.heads.LEAPMarginHead`'s ``logits``. Every rank of
        the group calls it (batch sizes may differ): the batches are checked on every rank and
        all-gathered, each shard scores the global batch (:meth:`shard_logits`), the shards'
        columns are all-gathered and each rank keeps its own rows. Inference only (detached);
        one host sync (the batch check)."""
        if self.world_size == 1:
            return self.shard_logits(embeddings).detach()
        group = self.process_group
        dummy = torch.zeros(
            embeddings.shape[0] if isinstance(embeddings, Tensor) and embeddings.dim() else 0,
            dtype=torch.long,
            device=self.weight.device,
        )
        _, rows = agree_on_batch(
            embeddings,
            dummy,
            self.embedding_size,
            self.num_classes,
            group=group,
            device=self.weight.device,
        )
        emb, _ = gather_batch(embeddings.detach(), dummy, group, pad_to=rows)
        local = self.shard_logits(emb).detach()  # (world * rows, C_r)
        widest = max(self.sizes)
        padded = local.new_zeros(local.shape[0], widest)
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=group)
        full = torch.cat([part[:, :n] for part, n in zip(parts, self.sizes)], dim=1)
        return full[self.rank * rows : self.rank * rows + embeddings.shape[0]]

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor: ...

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """LEAP margin softmax loss of the global batch (see the class docstring)."""
        return self.feature_cloud.watch(self._loss(embeddings, labels))

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        group = self.process_group
        distributed = self.world_size > 1
        train = self.training and torch.is_grad_enabled()
        problem = inference_problem(embeddings, self.feature_cloud.step) if train else None
        parametrized, refusal = False, None
        # an imprint still ahead into a recomputed weight (prune, the hook-based weight_norm)
        # is refused as the dense head refuses it, before the gather: the ranks agree on the
        # refusal with the batch, so every rank raises (compiled too, where only one rank's
        # shard has the hook: the check runs eagerly, a graph break, as the imprint does)
        if train and not is_compiling():
            parametrized, refusal = _imprint_refusal(self, self.feature_cloud)
        elif train and recomputed_weight(self, self.feature_cloud):
            parametrized, refusal = _imprint_refusal_outside_the_graph(self, self.feature_cloud)
        problem = problem or refusal
        if distributed:  # every rank agrees on every check before the gather: all raise or none
            labels, rows = agree_on_batch(
                embeddings,
                labels,
                self.embedding_size,
                self.num_classes,
                validate=self.validate,
                group=group,
                device=self.weight.device,
                pad_to=self.pad_to,
                same_dtype=True,
                problem=problem,
                settings=self.margin_settings()
                + (("reduction", self.reduction),)
                + self.feature_cloud.agreed_settings(),
            )
        elif problem is not None:
            raise problem
        else:
            labels = check_batch(
                embeddings, labels, self.embedding_size, self.num_classes, self.validate
            )
        if train:
            labels = trainable_labels(labels)
        local_rows = embeddings.shape[0]
        if distributed:
            scale = float(self.world_size) if self.ddp_backbone else 1.0
            emb, lab = gather_batch(
                embeddings,
                labels,
                group,
                pad_to=rows,
                differentiable=True,
                grad_scale=scale,
            )
        else:
            emb, lab = embeddings, labels
        # the noise key is the step's before the count moves; stream 0: the dense head's cloud
        sampling = train and self.sample_rate < 1.0
        key = (
            self.feature_cloud.noise_key(stream=0, purpose=N.PURPOSE_SAMPLING) if sampling else None
        )
        counted = train and self.feature_cloud.counts_batch(emb, count_empty=distributed)
        if train and is_compiling() and recomputed_weight(self, self.feature_cloud):
            _imprint_outside_the_graph(
                self,
                self.feature_cloud,
                train,
                counted,
                1,
                self.shard_start,
                parametrized=parametrized,
            )
        else:  # through a parametrization's right_inverse, as the dense head's imprint
            imprint_weight(
                self,
                self.feature_cloud,
                train,
                counted,
                class_start=self.shard_start,
                parametrized=parametrized,
            )
        std, cloud_key = self.feature_cloud.advance(
            emb.detach(), lab, train=train, count_empty=distributed
        )

        owned = (lab >= self.shard_start) & (lab < self.shard_end)
        local = torch.where(owned, lab - self.shard_start, torch.full_like(lab, -1))
        weight, columns = self.weight, None
        if key is not None:
            weight, local, columns = self._sample_classes(local, key)
        valid = lab >= 0
        if self.margin_rule.has_fused:
            # Partial FC on the fused kernels: per-shard logits, log-sum-exp and target term;
            # the row maximum, the sum of exponentials and the target logit all-reduced
            noise = None
            noise_std, noise_key, target_angles = fused_cloud(self.feature_cloud, (std, cloud_key))
            if noise_std is not None and columns is not None:  # sampled classes: their own draws
                assert cloud_key is not None  # a cloud draw comes with its key
                noise = N.counter_normal_at(
                    cloud_key, emb.shape[0], columns + self.shard_start, self.num_classes
                )
            x, w = FC.common_float(emb, weight)
            per_sample = fused.margin_loss(
                x,
                w,
                local,
                margin_type=self.margin_rule,
                scale=self.scale,
                margin=self.margin,
                noise_std=noise_std,
                noise=noise,
                noise_key=None if noise is not None else noise_key,
                target_angles=target_angles,
                class_start=self.shard_start,
                num_classes=self.num_classes,
                reduction="none",
                validate=False,
                row_valid=valid,
                reducer=_all_reducer(group) if distributed else None,
            )
        else:  # no fused derivative: logits and a sharded softmax
            logits = self._margin_logits(emb, weight, local, std, cloud_key, columns)
            per_sample = _sharded_cross_entropy(logits, local, group, distributed)
            per_sample = torch.where(valid, per_sample, torch.zeros_like(per_sample))
        if self.reduction == "none":  # own rows; every rank's upstream weights reach all shards
            rows = emb.shape[0] // self.world_size
            if not distributed:
                return per_sample[:local_rows]
            return own_rows(per_sample, self.rank, rows, local_rows, group)
        total = per_sample.sum()
        if self.reduction == "sum":
            return total
        return total / valid.sum().clamp_min(1)

    def _margin_logits(
        self,
        emb: Tensor,
        weight: Tensor,
        local: Tensor,
        std: Optional[Tensor],
        key: Optional[Tensor],
        columns: Optional[Tensor],
    ) -> Tensor:
        """This shard's margin logits; the cloud of the kept global classes (dense head's draw)."""
        if columns is None or std is None or key is None or self.feature_cloud.mode != "paper":
            return cloud_margin_logits(  # a target-only cloud does not depend on the columns
                self.feature_cloud,
                emb,
                weight,
                local,
                (std, key),
                margin_type=self.margin_rule,
                scale=self.scale,
                margin=self.margin,
                class_start=self.shard_start,
            )
        assert key is not None  # a cloud draw comes with its key
        alpha = N.counter_normal_at(
            key, emb.shape[0], columns + self.shard_start, self.num_classes
        ).t() * std.unsqueeze(1)
        cos = FC.cosine_logits(*FC.common_float(emb, weight))
        return FC.margin_logits(
            cos,
            local,
            margin_type=self.margin_rule,
            scale=self.scale,
            margin=self.margin,
            alpha=alpha,
        )

    def _sample_classes(self, local: Tensor, key: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """PartialFC-style subset of this shard's classes: all positives plus random negatives.

        Returns the kept weight rows, the labels re-indexed into them and the kept columns."""
        c = self.weight.shape[0]
        device = local.device
        k = min(c, max(math.ceil(self.sample_rate * c), local.shape[0]))
        if k >= c:
            return self.weight, local, torch.arange(c, device=device)
        score = torch.cat(
            [
                N.counter_uniform(key, self.shard_start, self.shard_end),
                torch.zeros(1, dtype=torch.float32, device=device),
            ]
        )
        slot = torch.where(local >= 0, local, torch.full_like(local, c))  # c: trash slot
        score.index_fill_(0, slot, 2.0)  # positives outrank every negative
        index = torch.topk(score[:c], k).indices.sort().values
        position = torch.full((c + 1,), -1, dtype=torch.long, device=device)
        position[index] = torch.arange(k, device=device)
        return self.weight.index_select(0, index), position[slot], index

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"shard=[{self.shard_start}, {self.shard_end}) of rank {self.rank}/{self.world_size}, "
            f"margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}, "
            f"reduction={self.reduction!r}, sample_rate={self.sample_rate}"
        )

    # ------------------------------------------------------------------ checkpoints
    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise what :meth:`load_state_dict` would refuse in this shard's entries under
        ``prefix``: another shard layout or class count, a weight that is not floating point or
        holds NaN / infinite values (a parametrized weight's ``original*`` too), a cloud state
        :meth:`FeatureCloud.check_state_dict` refuses; changes nothing (a 0.1.0 layout is
        migrated in a copy). :func:`feature_cloud.check_state_dict` runs it for every head
        inside a model."""
        state_dict = migrated_for_checking(
            state_dict, prefix, prefix, lambda copy, old, _: self._migrate(copy, old, None)
        )
        self._check_state(state_dict, prefix)

    def _migrate(
        self, state_dict: Dict[str, Any], prefix: str, cloud: Optional[FeatureCloud]
    ) -> None:
        """A 0.1.0 state's entries in this release's layout, in place (``cloud``: the cloud whose
        settings off 0.1.0's are warned about)."""
        extra = migrate_state_dict(state_dict, prefix, prefix + "feature_cloud.", cloud)
        if "shard" in extra:  # 0.1.0 kept the layout in the extra state
            state_dict.setdefault(prefix + "shard_rank", torch.tensor(int(extra["shard"]["rank"])))
            state_dict.setdefault(
                prefix + "shard_sizes", torch.tensor(list(extra["shard"]["sizes"]))
            )

    def _check_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        key = prefix + "weight"
        saved = state_dict.get(key)
        if isinstance(saved, Tensor) and saved.dim() != self.weight.dim():  # before the unpacking
            raise ValueError(other_rank_message(key, saved.shape, self.weight.shape))
        layout = state_dict.get(prefix + "shard_sizes")
        # a dense head's state (no shard layout) is refused at every world size: at world size
        # 1 its weight fits, and torch said only "Missing key(s): shard_rank, shard_sizes"
        if (
            (key in state_dict and layout is None)
            or (key in state_dict and tuple(state_dict[key].shape) != tuple(self.weight.shape))
        ) or (
            layout is not None
            and not layout.is_meta  # shapes only (prepare_dcp_load)
            and (
                layout.tolist() != self.sizes or int(state_dict[prefix + "shard_rank"]) != self.rank
            )
        ):
            rows, d = state_dict[key].shape if key in state_dict else (None, None)
            what = (
                f"a dense state dict ({rows} classes of size {d}, no shard layout: "
                f"split_state_dict(state, {len(self.sizes)}) gives each rank its shard)"
                if layout is None
                else f"checkpoint shard has {rows} classes of size {d} (rank "
                f"{_item(state_dict.get(prefix + 'shard_rank'))} of sizes {layout.tolist()})"
            )
            raise ValueError(
                f"{what}; rank {self.rank} holds "
                f"{self.weight.shape[0]} classes of size {self.embedding_size} of sizes "
                f"{self.sizes} (use consolidate_state_dicts / split_state_dict to change the "
                "layout)"
            )
        refuse_bad_weights(state_dict, prefix, "weight", self)  # parametrized too
        # torch loads the weight before the cloud's statistics, which would refuse theirs with
        # the weight already taken (as the dense head): checked first, nothing changes
        self.feature_cloud.check_state_dict(state_dict, prefix + "feature_cloud.")

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        self._migrate(state_dict, prefix, self.feature_cloud)
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _imprint_refusal(module: nn.Module, cloud: FeatureCloud) -> Tuple[bool, Optional[Exception]]:
    """:func:`~feature_cloud.heads.imprint_through_parametrization`'s answer, and its refusal
    returned rather than raised (``(False, refusal)``), for the ranks to agree on."""
    try:
        return imprint_through_parametrization(module, cloud), None
    except (ValueError, RuntimeError) as refusal:
        return False, refusal


# compiled, with a recomputed weight (recomputed_weight): the step read and the refusal eagerly,
# before the batch agreement, so that every rank raises (not only the one with the hook)
_imprint_refusal_outside_the_graph = disable_compile(
    _imprint_refusal,
    "imprint_step with a parametrized (or hook-recomputed) shard weight: checked eagerly "
    "before the ranks agree on the batch, a graph break. With fullgraph=True, run the steps "
    "up to imprint_step eagerly (after resuming past it, one eager step) and compile afterwards",
)


def _item(x: Optional[Tensor]) -> Optional[int]:
    return None if x is None else int(x)


def _broadcast_seed(process_group: ProcessGroup) -> int:
    """A seed from rank 0's global RNG, the same on every rank of ``process_group``."""
    s = torch.randint(0, 2**62, (1,), dtype=torch.long, device="cpu")  # also under meta
    if is_distributed(process_group):
        s = s.to(collective_device(s, process_group))
        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast(s, src=src, group=process_group)
    return int(s.item())


def _all_reducer(group: ProcessGroup) -> fused.Reducer:
    """``fused.margin_loss``'s shard reducer: an all-reduce (max or sum) over ``group``."""

    def reduce(t: Tensor, op: str) -> Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def _sharded_cross_entropy(
    logits: Tensor, local: Tensor, group: ProcessGroup, distributed: bool
) -> Tensor:
    """Per-sample softmax cross-entropy over class shards held by the ranks of ``group``.

    ``logits`` ``(N, C_r)`` are this shard's columns; ``local`` the target column in this shard
    or ``-1`` when another shard (or none, for ignored rows) owns it. The maximum is only a
    shift for stability (no gradient flows through it); the sum of exponentials and the target
    logit are all-reduced with :class:`_ReplicatedSum`.
    """
    row_max = logits.detach().max(dim=1).values
    if distributed:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    target = logits.gather(1, local.clamp_min(0).unsqueeze(1)).squeeze(1)
    target = torch.where(local >= 0, target, torch.zeros_like(target))
    sum_exp = torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1)
    if distributed:
        sum_exp = _ReplicatedSum.apply(sum_exp, group)
        target = _ReplicatedSum.apply(target, group)
    return torch.log(sum_exp) + (row_max - target)  # near-equal logits cancel first


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_CLOUD = "feature_cloud."
_LAYOUT = ("shard_rank", "shard_sizes")


def _upgraded(state: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    """A copy of ``state`` with a 0.1.0 head under ``prefix`` in the tensor-only layout."""
    out = dict(state)
    extra = migrate_state_dict(out, prefix, prefix + _CLOUD)
    if "shard" in extra:
        out.setdefault(prefix + "shard_rank", torch.tensor(int(extra["shard"]["rank"])))
        out.setdefault(prefix + "shard_sizes", torch.tensor(list(extra["shard"]["sizes"])))
    return out


def consolidate_state_dicts(
    shard_states: Sequence[Mapping[str, Any]], prefix: str = "", check: bool = True
) -> Dict[str, Any]:
    """Merge the ``state_dict()`` of every rank's :class:`ShardedLEAPMarginHead` (in rank order)
    into the state dict of a single-process :class:`~feature_cloud.heads.LEAPMarginHead`.

    The weight rows are concatenated; the replicated cloud (statistics, step, seed) comes from
    rank 0 (``check=True`` verifies that every shard holds the same). The noise is counter-based,
    so the dense head continues the sharded run's cloud exactly. ``prefix`` selects the head
    inside a larger model's state dict (e.g. ``"heads.classifier."``); other keys are taken from
    rank 0. 0.1.0 shard checkpoints are accepted.
    """
    if len(shard_states) == 0:
        raise ValueError("consolidate_state_dicts needs at least one shard state dict")
    states = [_upgraded(state, prefix) for state in shard_states]
    for r, state in enumerate(states):
        if prefix + "shard_rank" not in state:
            raise ValueError(
                f"state dict {r} has no sharded head under prefix {prefix!r} (missing "
                f"{prefix + 'shard_rank'!r})"
            )
        if int(state[prefix + "shard_rank"]) != r:
            raise ValueError(
                f"state dict {r} is the shard of rank {int(state[prefix + 'shard_rank'])}; "
                "pass the shards in rank order"
            )
    sizes = states[0][prefix + "shard_sizes"].tolist()
    if len(sizes) != len(states):
        raise ValueError(f"the shards were saved by {len(sizes)} ranks, got {len(states)}")
    for r, state in enumerate(states):
        if tuple(state[prefix + "weight"].shape[:1]) != (sizes[r],):
            raise ValueError(
                f"shard {r} weight has {state[prefix + 'weight'].shape[0]} rows, "
                f"expected {sizes[r]}"
            )
    out: Dict[str, Any] = dict(states[0])
    out[prefix + "weight"] = torch.cat([s[prefix + "weight"] for s in states], 0)
    for name in _LAYOUT:
        del out[prefix + name]
    cloud_keys = [k for k in out if k.startswith(prefix + _CLOUD)]
    if check:
        for r, state in enumerate(states[1:], start=1):
            for k in cloud_keys:
                if not torch.equal(state[k], out[k]):
                    raise ValueError(
                        f"shard {r} differs from shard 0 in {k!r}: the statistics "
                        "must be replicated"
                    )
    return out


def split_state_dict(
    state: Mapping[str, Any],
    world_size: int,
    shard_sizes: Optional[Sequence[int]] = None,
    prefix: str = "",
) -> List[Dict[str, Any]]:
    """Split a single-process :class:`~feature_cloud.heads.LEAPMarginHead` state dict into the
    state dicts of ``world_size`` :class:`ShardedLEAPMarginHead` ranks (weight rows split by
    ``shard_sizes``, default :func:`even_shard_sizes`; the cloud: statistics, step and seed,
    replicated). 0.1.0 checkpoints are accepted.
    """
    key = prefix + "weight"
    if key not in state:
        raise ValueError(f"state dict has no {key!r}: not a LEAPMarginHead under prefix {prefix!r}")
    state = _upgraded(state, prefix)
    if prefix + "shard_rank" in state:
        raise ValueError("state dict is already a shard; consolidate it first")
    weight = state[key]
    num_classes = weight.shape[0]
    sizes = (
        _check_sizes(shard_sizes, num_classes, world_size)
        if shard_sizes is not None
        else even_shard_sizes(num_classes, world_size)
    )
    out = []
    for r, rows in enumerate(torch.split(weight, sizes, 0)):
        shard = dict(state)
        shard[key] = rows.clone()
        shard[prefix + "shard_rank"] = torch.tensor(r, dtype=torch.long)
        shard[prefix + "shard_sizes"] = torch.tensor(sizes, dtype=torch.long)
        out.append(shard)
    return out
