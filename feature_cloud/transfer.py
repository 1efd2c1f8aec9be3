"""``FeatureTransfer``: FTL's center-based feature transfer (Yin et al. 2019, Sec. 3.3, Algorithm 1).

A thin stateful Module around the FTL functions of :mod:`feature_cloud.functional`: it holds the
statistics of UpdateStats() (centers ``C``, PCA basis ``Q``, hard list ``h``) as buffers and
applies Eq. 6.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Union,
)

import torch
from torch import Tensor

from . import functional as FC
from ._buffers import KeepBufferDtypes, normal_tensors, resized_buffer
from ._compat import is_compiling
from ._validation import (
    ClassCounts,
    any_nonfinite,
    as_float,
    as_int,
    check_class_counts,
    check_labels,
    raise_for_damage,
    warn_user,
)

__all__ = ["FeatureTransfer", "FeatureBatch", "UpdatedStats"]

# buffers whose length depends on the data; resized when a checkpoint is loaded
_VARIABLE_BUFFERS = ("basis", "hard_indices", "hard_labels", "tail_indices", "tail_labels")


class FeatureBatch(NamedTuple):
    """One batch of rich features ``g`` for :meth:`FeatureTransfer.update_stats`.

    ``features`` ``(B, D)``; ``labels`` ``(B,)`` (``< 0`` ignored); ``indices`` ``(B,)`` dataset
    indices (``None``: positions in the stream, so the stream must then be unshuffled);
    ``flipped`` ``(B, D)`` features of the horizontally flipped inputs (Eq. 5, optional);
    ``keep`` ``(B,)`` bool quality filter :math:`\\Omega` (Eq. 5, optional).
    """

    features: Tensor
    labels: Tensor
    indices: Optional[Tensor] = None
    flipped: Optional[Tensor] = None
    keep: Optional[Tensor] = None


FeatureSource = Union[Iterable[Any], Callable[[], Iterable[Any]]]


class UpdatedStats(NamedTuple):
    """New statistics of :meth:`FeatureTransfer.compute_stats`, not yet taken (float64
    centers, covariance, eigenvalues and mean distances; the buffers' names otherwise)."""

    centers: Tensor
    has_center: Tensor
    counts: Tensor
    regular: Tensor
    covariance: Tensor
    eigenvalues: Tensor
    mean_distance: Tensor
    basis: Tensor
    hard_indices: Tensor
    hard_labels: Tensor
    tail_indices: Tensor
    tail_labels: Tensor
    num_regular_samples: int


class FeatureTransfer(KeepBufferDtypes):
    r"""FTL feature transfer: UpdateStats() of Algorithm 1 and the transfer of Eq. 6.

    :meth:`update_stats` reads the rich features ``g`` of the whole training set (a stream of
    :class:`FeatureBatch`, or tuples in that order) and computes

    * class centers ``C`` (Eq. 5): mean of ``g`` and of the flipped-image feature over the samples
      kept by the quality filter :math:`\Omega_i`; plain class means when neither is given. A class
      whose samples are all filtered out falls back to the mean over all its samples;
    * the intra-class covariance ``V`` of the regular classes, :math:`\frac1N\sum (g-c_y)(g-c_y)^T`
      over *all* their samples (Algorithm 1), accumulated batch by batch in float64 (``O(D^2)``
      memory, no residual matrix is ever held);
    * the PCA basis ``Q`` ``(D, k)``: the top ``num_components`` eigenvectors of ``V``, or the
      smallest ``k`` reaching ``energy`` of the total variance (paper: 150 of 320, 95%);
    * the hard list ``h``: dataset indices (``hard_indices``, ``hard_labels``) of regular-class
      samples farther from their center than the class's mean distance; and the indices of the
      long-tail samples (``tail_indices``, ``tail_labels``) for the long-tail batch sampler.

    **Two passes.** UpdateStats needs the final centers before residuals, distances and the
    per-class mean distance exist, so it reads the stream twice: pass 1 accumulates the centers,
    pass 2 forms exact residuals ``g - c`` against them (no ``sum gg^T - n cc^T`` cancellation) and
    accumulates ``V`` and the distances. Memory is ``O(D^2 + C D)`` plus one scalar distance and
    index per regular sample (needed to compare against ``d_i`` at the end). The source must
    therefore be re-iterable (a list, a ``DataLoader``) or a zero-argument callable returning a
    fresh iterable; both passes must yield the same samples. All statistics are committed
    together at the end: an error leaves the previous ones untouched.

    Regular vs long-tail classes: an explicit ``regular_mask``, or ``class_counts > tail_threshold``
    (paper: a class with <= 20 images is long-tail); with neither, the counts are taken from pass 1
    of every :meth:`update_stats` (all valid samples, before the quality filter).

    :meth:`transfer` (Eq. 6) is batched, differentiable w.r.t. ``g_regular`` and device-agnostic.
    All statistics are buffers and travel with ``state_dict``.

    Args:
        feature_dim: ``D``, the size of the rich feature ``g`` (paper: 320).
        num_classes: ``C``.
        num_components: keep the top ``k`` eigenvectors (``1 <= k <= D``).
        energy: keep the smallest ``k`` reaching this fraction of the variance; the default 0.95
            (paper) applies when ``num_components`` is not given.
        tail_threshold: classes with ``count <= tail_threshold`` are long-tail (paper: 20).
        class_counts: images per class ``(C,)``.
        regular_mask: bool ``(C,)``, ``True`` for regular classes (overrides the counts).
        validate: check label values in :meth:`transfer` (one host sync per call); skipped
            under ``torch.compile``, as the heads' value checks are (the check read the labels
            on the host: ``fullgraph=True`` refused it, and without it the graph broke there).
    """

    centers: Tensor
    has_center: Tensor
    class_counts: Tensor
    regular: Tensor
    covariance: Tensor
    eigenvalues: Tensor
    basis: Tensor
    mean_distance: Tensor
    hard_indices: Tensor
    hard_labels: Tensor
    tail_indices: Tensor
    tail_labels: Tensor

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        *,
        num_components: Optional[int] = None,
        energy: Optional[float] = None,
        tail_threshold: int = 20,
        class_counts: Optional[ClassCounts] = None,
        regular_mask: Optional[Union[Tensor, Sequence[bool]]] = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        d, c = as_int(feature_dim, "feature_dim", 1), as_int(num_classes, "num_classes", 1)
        if num_components is not None:
            num_components = as_int(num_components, "num_components", 1)
        if energy is not None:
            energy = as_float(energy, "energy", minimum=0.0, maximum=1.0, min_inclusive=False)
        tail_threshold = as_int(tail_threshold, "tail_threshold", 0)
        if num_components is not None and energy is not None:
            raise ValueError("give num_components or energy, not both")
        if num_components is not None and not 1 <= int(num_components) <= d:
            raise ValueError(
                f"num_components must be in [1, feature_dim={d}], got {num_components} (k > D?)"
            )
        if num_components is None:  # energy and tail_threshold were range-checked above
            energy = 0.95 if energy is None else float(energy)
        self.feature_dim, self.num_classes = d, c
        self.num_components_requested = None if num_components is None else int(num_components)
        self.energy = energy
        self.tail_threshold = int(tail_threshold)
        self.validate = bool(validate)

        counts = torch.zeros(c, dtype=torch.long, device="cpu")  # host, also under meta
        regular = torch.zeros(c, dtype=torch.bool, device="cpu")
        self._counts_given = class_counts is not None
        self._regular_fixed = class_counts is not None or regular_mask is not None
        self._mask_given = regular_mask is not None
        if class_counts is not None:
            counts = check_class_counts(class_counts, c).cpu()
            regular = FC.ftl_regular_classes(counts, self.tail_threshold)
        if regular_mask is not None:
            regular = torch.as_tensor(regular_mask, device="cpu").flatten()
            if regular.dtype != torch.bool or regular.shape != (c,):
                raise ValueError(f"regular_mask must be a bool tensor of {c} entries")
        if self._regular_fixed and not bool(regular.any()):
            raise ValueError(
                "no regular class: every class has <= tail_threshold images (or regular_mask is "
                "all False); the intra-class variance to transfer needs regular classes"
            )
        #: host copies of the constructor's counts and regular classes (reset_parameters)
        self._initial = (counts.clone(), regular.clone())
        self.register_buffer("class_counts", counts)
        self.register_buffer("regular", regular.clone())
        self.register_buffer("centers", torch.zeros(c, d, dtype=torch.float32))
        self.register_buffer("has_center", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("covariance", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("eigenvalues", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("basis", torch.zeros(d, 0, dtype=torch.float32))
        self.register_buffer("mean_distance", torch.zeros(c, dtype=torch.float32))
        for name in ("hard_indices", "hard_labels", "tail_indices", "tail_labels"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))

    # ------------------------------------------------------------------ properties
    @property
    def ready(self) -> bool:
        """Whether :meth:`update_stats` has run (shape test only: no device sync)."""
        return self.basis.shape[1] > 0

    @property
    def num_components(self) -> int:
        """``k``, the number of columns of ``Q`` (0 before :meth:`update_stats`)."""
        return int(self.basis.shape[1])

    @property
    def explained_energy(self) -> float:
        """Fraction of the regular classes' intra-class variance that ``Q`` keeps."""
        lam = self.eigenvalues.clamp_min(0)
        total = float(lam.sum())
        return float(lam[: self.num_components].sum()) / total if total > 0 else 0.0

    # ------------------------------------------------------------------ Eq. 6
    def transfer(self, g_regular: Tensor, y_regular: Tensor, y_tail: Tensor) -> Tensor:
        r"""Transferred features :math:`\tilde g = c_{y_t} + QQ^T(g_r - c_{y_r})`, FTL Eq. 6.

        ``g_regular`` ``(B, D)`` features of regular-class samples with labels ``y_regular``
        ``(B,)``; ``y_tail`` ``(B,)`` the classes that receive them. Row ``k`` keeps the center of
        ``y_tail[k]`` and carries the residual of ``g_regular[k]`` projected on ``Q``. This is
        Eq. 6, *not* the Transfer() box of Algorithm 1, whose center indices are swapped (it
        would add the regular center and subtract the tail one).
        """
        if not self.ready:
            raise RuntimeError("FeatureTransfer has no statistics yet: call update_stats() first")
        if not isinstance(g_regular, Tensor) or not g_regular.is_floating_point():
            raise TypeError("g_regular must be a floating point tensor")
        if g_regular.dim() != 2 or g_regular.shape[1] != self.feature_dim:
            raise ValueError(
                f"g_regular must have shape (batch, {self.feature_dim}), got {tuple(g_regular.shape)}"
            )
        b = g_regular.shape[0]
        y_regular = check_labels(y_regular, b, "y_regular")
        y_tail = check_labels(y_tail, b, "y_tail")
        if self.validate and b > 0 and not is_compiling():  # a host read: eager only
            self._check_transfer_labels(y_regular, y_tail)
        dev = self.centers.device
        out = FC.feature_transfer(
            g_regular, y_regular.to(dev), y_tail.to(dev), self.centers, self.basis
        )
        return out

    def _check_transfer_labels(self, y_regular: Tensor, y_tail: Tensor) -> None:
        c = self.num_classes
        in_range = ((y_regular >= 0) & (y_regular < c)).all() & ((y_tail >= 0) & (y_tail < c)).all()
        yr, yt = (
            y_regular.clamp(0, c - 1).to(self.centers.device),
            y_tail.clamp(0, c - 1).to(self.centers.device),
        )
        flags = torch.stack(
            [
                ~in_range.to(self.centers.device),
                ~(self.regular[yr] & self.has_center[yr]).all(),
                ~self.has_center[yt].all(),
            ]
        ).tolist()
        if flags[0]:
            raise ValueError(f"labels must lie in [0, {c}) for transfer()")
        if flags[1]:
            bad = y_regular[~(self.regular[yr] & self.has_center[yr]).to(y_regular.device)]
            raise ValueError(
                "y_regular must be regular classes seen by update_stats() (is the argument order "
                f"transfer(g_regular, y_regular, y_tail)?); got e.g. class {int(bad[0])}"
            )
        if flags[2]:
            bad = y_tail[~self.has_center[yt].to(y_tail.device)]
            raise ValueError(f"y_tail class {int(bad[0])} has no center: unknown to update_stats()")

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, g_regular: Tensor, y_regular: Tensor, y_tail: Tensor) -> Tensor: ...

    def forward(self, g_regular: Tensor, y_regular: Tensor, y_tail: Tensor) -> Tensor:
        """Same as :meth:`transfer`."""
        return self.transfer(g_regular, y_regular, y_tail)

    # ------------------------------------------------------------------ UpdateStats
    @torch.no_grad()
    def update_stats(self, source: FeatureSource) -> Dict[str, Any]:
        """UpdateStats() of Algorithm 1 over a whole dataset, in two streaming passes.

        ``source``: a re-iterable of :class:`FeatureBatch` (or tuples ``(features, labels[,
        indices[, flipped[, keep]]])``) or a zero-argument callable returning a fresh one. Returns
        a summary (``num_components``, ``explained_energy``, ``num_hard``, ``num_regular_classes``,
        ``num_tail_classes``, ``num_regular_samples``). Nothing changes unless both passes succeed.
        """
        return self.commit_stats(self.compute_stats(source))

    @torch.no_grad()
    def compute_stats(self, source: FeatureSource) -> UpdatedStats:
        """The two passes of :meth:`update_stats` without changing this module: the new
        statistics, for :meth:`commit_stats` (data parallel, the ranks agree in between)."""
        open_pass = self._opener(source)
        dev = self.centers.device
        c, d = self.num_classes, self.feature_dim

        # pass 1: Eq. 5 centers (kept samples) + fallback means (all samples) + image counts
        kept_sum = torch.zeros(c, d, dtype=torch.float64, device=dev)
        kept_w = torch.zeros(c, dtype=torch.float64, device=dev)
        all_sum = torch.zeros(c, d, dtype=torch.float64, device=dev)
        all_w = torch.zeros(c, dtype=torch.float64, device=dev)
        counts = torch.zeros(c, dtype=torch.long, device=dev)
        seen = 0
        stream_labels: List[Tensor] = []  # without indices: positions must match in pass 2
        for batch in open_pass():
            fb = self._as_batch(batch, dev)
            s, w = FC.ftl_center_sums(fb.features, fb.labels, c, fb.flipped, fb.keep)
            kept_sum += s
            kept_w += w
            s, w = FC.ftl_center_sums(fb.features, fb.labels, c, fb.flipped)
            all_sum += s
            all_w += w
            valid = fb.labels >= 0
            counts.index_add_(0, fb.labels.clamp_min(0), valid.to(torch.long))
            seen += fb.features.shape[0]
            if fb.indices is None:
                stream_labels.append(fb.labels)
        if seen == 0:
            raise ValueError("update_stats() got an empty stream")
        kept_c, kept_has = FC.ftl_centers(kept_sum, kept_w)
        all_c, has_center = FC.ftl_centers(all_sum, all_w)
        centers64 = torch.where(kept_has.unsqueeze(1), kept_c, all_c)
        if self._regular_fixed:
            regular = self.regular.clone()
        else:
            regular = FC.ftl_regular_classes(counts, self.tail_threshold)
        regular_seen = regular & has_center
        if not bool(regular_seen.any()):
            raise ValueError(
                "empty regular set: no class seen by update_stats() has more than "
                f"tail_threshold={self.tail_threshold} images (or is marked regular)"
            )

        # pass 2: exact residuals against the final centers
        scatter = torch.zeros(d, d, dtype=torch.float64, device=dev)
        n_reg = torch.zeros((), dtype=torch.long, device=dev)
        dist_sum = torch.zeros(c, dtype=torch.float64, device=dev)
        dist_cnt = torch.zeros(c, dtype=torch.float64, device=dev)
        reg_dist: List[Tensor] = []
        reg_idx: List[Tensor] = []
        reg_lab: List[Tensor] = []
        tail_idx: List[Tensor] = []
        tail_lab: List[Tensor] = []
        position = 0
        first = torch.cat(stream_labels) if stream_labels else None
        for batch in open_pass():
            fb = self._as_batch(batch, dev)
            b = fb.features.shape[0]
            idx = fb.indices
            if idx is None:
                idx = torch.arange(position, position + b, device=dev)
                if first is None or not torch.equal(first[position : position + b], fb.labels):
                    raise ValueError(
                        "update_stats(): the batches have no indices and pass 2 yielded other "
                        f"labels than pass 1 at positions {position}..{position + b - 1}: a "
                        "shuffling loader? Without indices the hard list holds stream "
                        "positions, so the source must yield the same order in both passes "
                        "(shuffle=False), or give dataset indices (FeatureBatch.indices)"
                    )
            position += b
            y = fb.labels
            yc = y.clamp_min(0)
            if bool((~has_center[yc] & (y >= 0)).any()):
                raise ValueError(
                    "pass 2 of update_stats() saw a class absent from pass 1: the "
                    "source must yield the same samples in both passes"
                )
            s, n = FC.ftl_residual_scatter(fb.features, y, centers64, regular)
            scatter += s
            n_reg += n
            dist = FC.ftl_center_distances(fb.features, y, centers64)
            is_reg = (y >= 0) & regular[yc]
            ds, dc = FC.ftl_class_mean(dist, y, c, mask=is_reg)
            dist_sum += ds
            dist_cnt += dc
            reg_dist.append(dist[is_reg])
            reg_idx.append(idx[is_reg])
            reg_lab.append(y[is_reg])
            is_tail = (y >= 0) & ~regular[yc]
            tail_idx.append(idx[is_tail])
            tail_lab.append(y[is_tail])
        if position != seen:
            raise ValueError(
                f"pass 1 saw {seen} samples but pass 2 saw {position}: the source "
                "must yield the same samples in both passes"
            )
        n_total = int(n_reg)
        if n_total < 2:
            raise ValueError("the regular classes have fewer than 2 samples: no covariance")
        rank = n_total - int(regular_seen.sum())  # centred per class: at most N - C_r
        wanted = self.num_components_requested
        if wanted is not None and wanted > rank:
            warn_user(
                f"num_components={wanted} exceeds the rank of the regular classes' centred "
                f"features (at most {rank}: {n_total} samples of {int(regular_seen.sum())} "
                "classes): the extra components are arbitrary directions without variance "
                "(with num_components = D the projection is the identity); lower it, or give "
                "energy instead"
            )
        covariance = scatter / n_total
        basis, evals = FC.ftl_pca_basis(
            covariance,
            self.num_components_requested,
            None if self.num_components_requested is not None else self.energy,
        )
        mean_distance = dist_sum / dist_cnt.clamp_min(1)
        dists = torch.cat(reg_dist)
        labs = torch.cat(reg_lab)
        hard = FC.ftl_hard_mask(dists, labs, mean_distance, regular)
        return UpdatedStats(
            centers64,
            has_center,
            counts,
            regular,
            covariance,
            evals,
            mean_distance,
            basis,
            torch.cat(reg_idx)[hard],
            labs[hard],
            torch.cat(tail_idx),
            torch.cat(tail_lab),
            n_total,
        )

    @torch.no_grad()
    def commit_stats(self, stats: UpdatedStats) -> Dict[str, Any]:
        """Take the statistics of :meth:`compute_stats` (all together); returns the summary of
        :meth:`update_stats`."""
        self.centers.copy_(stats.centers.to(self.centers.dtype))
        self.has_center.copy_(stats.has_center)
        if not self._counts_given:
            self.class_counts.copy_(stats.counts)
        self.regular.copy_(stats.regular)
        self.covariance.copy_(stats.covariance)
        self.eigenvalues.copy_(stats.eigenvalues)
        self.mean_distance.copy_(stats.mean_distance.to(self.mean_distance.dtype))
        # the resized buffers as normal tensors when the statistics were computed inside
        # torch.inference_mode() (the transfer differentiates through basis in stage 1)
        self.basis = _normal(stats.basis.to(torch.float32).contiguous())  # a loaded one's layout
        self.hard_indices = _normal(stats.hard_indices.to(torch.long))
        self.hard_labels = _normal(stats.hard_labels.to(torch.long))
        self.tail_indices = _normal(stats.tail_indices.to(torch.long))
        self.tail_labels = _normal(stats.tail_labels.to(torch.long))
        regular, has_center = stats.regular, stats.has_center
        return {
            "num_components": self.num_components,
            "explained_energy": self.explained_energy,
            "num_hard": int(self.hard_indices.numel()),
            "num_regular_classes": int((regular & has_center).sum()),
            "num_tail_classes": int((has_center & ~regular).sum()),
            "num_regular_samples": stats.num_regular_samples,
        }

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _opener(source: FeatureSource) -> Callable[[], Iterable[Any]]:
        if callable(source) and not hasattr(source, "__iter__"):
            return source
        if not hasattr(source, "__iter__"):
            raise TypeError(
                "source must be a re-iterable of feature batches or a callable returning one"
            )
        if iter(source) is source:
            raise TypeError(
                "update_stats() reads the data twice (centers, then residuals): pass a re-iterable "
                "(list, DataLoader) or a zero-argument callable, not a one-shot iterator/generator"
            )
        return lambda: source

    def _as_batch(self, batch: Any, device: torch.device) -> FeatureBatch:
        if isinstance(batch, dict):
            fb = FeatureBatch(**batch)
        elif isinstance(batch, FeatureBatch):
            fb = batch
        elif isinstance(batch, (tuple, list)):
            if not 2 <= len(batch) <= 5:
                raise ValueError(
                    "a feature batch is (features, labels[, indices[, flipped[, keep]]])"
                )
            fb = FeatureBatch(*batch)
        else:
            raise TypeError(f"expected a FeatureBatch or tuple, got {type(batch).__name__}")
        g, y = fb.features, fb.labels
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise TypeError("features must be a floating point tensor")
        if g.dim() != 2 or g.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must have shape (batch, {self.feature_dim}), got {tuple(g.shape)}"
            )
        b = g.shape[0]
        y = check_labels(y, b)
        if fb.flipped is not None and (
            not isinstance(fb.flipped, Tensor)
            or not fb.flipped.is_floating_point()
            or fb.flipped.shape != g.shape
        ):
            raise ValueError(
                f"flipped must be a floating point tensor of the shape of features {tuple(g.shape)}"
            )
        if fb.keep is not None and (fb.keep.dtype != torch.bool or fb.keep.shape != (b,)):
            raise ValueError(f"keep must be a bool tensor of shape ({b},)")
        indices = None if fb.indices is None else check_labels(fb.indices, b, "indices")
        if b and bool(((y < -1) | (y >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or be -1 (ignored)")
        if b and not bool(torch.isfinite(g).all()):
            raise ValueError("features contain NaN or Inf values")
        if b and fb.flipped is not None and not bool(torch.isfinite(fb.flipped).all()):
            raise ValueError("flipped features contain NaN or Inf values")
        if b and indices is not None and bool(((indices < 0) & (y >= 0)).any()):
            raise ValueError(
                "indices must be dataset indices (>= 0), got a negative one on a labelled row"
            )
        return FeatureBatch(
            g.to(device),
            y.to(device),
            None if indices is None else indices.to(device),
            None if fb.flipped is None else fb.flipped.to(device),
            None if fb.keep is None else fb.keep.to(device),
        )

    def reset_parameters(self) -> None:
        """Back to the state of construction (no statistics: :meth:`update_stats` to run; the
        constructor's class counts and regular classes): for a module built on the ``meta``
        device and moved by ``to_empty``."""
        device = self.centers.device
        # a pickle of an earlier release has no host copies: its buffers hold them
        counts, regular = getattr(self, "_initial", (self.class_counts, self.regular))
        for name in ("centers", "has_center", "covariance", "eigenvalues", "mean_distance"):
            getattr(self, name).zero_()
        with normal_tensors():  # inside torch.inference_mode() too
            self.class_counts = counts.to(device, copy=True)
            self.regular = regular.to(device, copy=True)
            self.basis = torch.zeros(self.feature_dim, 0, dtype=torch.float32, device=device)
            for name in ("hard_indices", "hard_labels", "tail_indices", "tail_labels"):
                setattr(self, name, torch.zeros(0, dtype=torch.long, device=device))

    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise if the statistics under ``prefix`` are of another class count or feature size
        (every shape but those of the data-sized buffers); changes nothing."""
        src = state_dict.get(prefix + "basis")
        if src is not None and (src.dim() != 2 or src.shape[0] != self.feature_dim):
            raise ValueError(
                f"checkpoint basis has shape {tuple(src.shape)}; this FeatureTransfer has "
                f"feature_dim={self.feature_dim}"
            )
        for name, cur in self._buffers.items():
            src = state_dict.get(prefix + name)
            if name in _VARIABLE_BUFFERS or cur is None or not isinstance(src, Tensor):
                continue
            if src.shape != cur.shape:
                raise ValueError(
                    f"checkpoint {name} has shape {tuple(src.shape)}, this FeatureTransfer's "
                    f"{tuple(cur.shape)} (num_classes={self.num_classes}, "
                    f"feature_dim={self.feature_dim}): statistics of another model"
                )
        self._check_values(state_dict, prefix)

    def _check_values(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Values an edited or damaged checkpoint can hold and :meth:`update_stats` cannot (as
        the head's statistics refuse theirs): non-finite statistics (a NaN center made every
        transferred feature NaN), a basis of more columns than dimensions, sample lists of
        unequal lengths, labels outside the classes, negative indices or counts. One host read,
        at load."""
        present = {
            name: value
            for name in self._buffers
            if isinstance(value := state_dict.get(prefix + name), Tensor) and not value.is_meta
        }
        basis = present.get("basis")
        if basis is not None and basis.shape[1] > self.feature_dim:
            raise ValueError(
                f"checkpoint's {prefix}basis has {basis.shape[1]} components for "
                f"feature_dim={self.feature_dim} (at most that many): the checkpoint is damaged "
                "or was edited"
            )
        for kind in ("hard", "tail"):
            idx, lab = present.get(f"{kind}_indices"), present.get(f"{kind}_labels")
            if idx is not None and lab is not None and idx.shape != lab.shape:
                raise ValueError(
                    f"checkpoint's {prefix}{kind}_indices and {kind}_labels have shapes "
                    f"{tuple(idx.shape)} and {tuple(lab.shape)} (one label a sample): the "
                    "checkpoint is damaged or was edited"
                )
        checks: Dict[str, Tensor] = {}
        for name in ("centers", "covariance", "eigenvalues", "basis", "mean_distance"):
            value = present.get(name)
            if value is not None and value.is_floating_point() and value.numel():
                checks[f"non-finite {name}"] = any_nonfinite(value)
        for name in ("hard_labels", "tail_labels"):
            value = present.get(name)
            if value is not None and value.numel():
                checks[f"{name} outside [0, {self.num_classes})"] = (
                    (value < 0) | (value >= self.num_classes)
                ).any()
        for name in ("hard_indices", "tail_indices", "class_counts"):
            value = present.get(name)
            if value is not None and value.numel():
                checks[f"negative {name}"] = (value < 0).any()
        raise_for_damage(checks, prefix.rstrip(".") or "FeatureTransfer")

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        # every shape checked before a data-sized buffer is resized: a refused checkpoint leaves
        # this module as it was
        self.check_state_dict(state_dict, prefix)
        for name in _VARIABLE_BUFFERS:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                src = state_dict[key]
                setattr(self, name, resized_buffer(src.shape, cur))  # inference_mode too
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        sel = (
            f"num_components={self.num_components_requested}"
            if self.num_components_requested is not None
            else f"energy={self.energy}"
        )
        return (
            f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, {sel}, "
            f"tail_threshold={self.tail_threshold}" + ("" if self.validate else ", validate=False")
        )


def _normal(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it when it is an inference tensor (made inside
    ``torch.inference_mode()``: autograd cannot save it, and it cannot be written in place
    outside that mode)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()
