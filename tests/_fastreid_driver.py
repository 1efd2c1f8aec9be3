"""The user's side of the fastreid end-to-end tests, run in fresh processes (subprocess).

``python tests/_fastreid_driver.py MODE OUT_JSON CONFIG [KEY VALUE ...]`` with fastreid's dataset
root in ``FASTREID_DATASETS``. Each mode is what a fastreid user runs, through fastreid's own
classes (``DefaultTrainer``, ``Checkpointer``, ``resume_or_load``), and writes a JSON summary
(plus tensors next to it) for the test to compare across processes:

* ``train``: ``DefaultTrainer(cfg)`` (or ``FTLTrainer``), ``resume_or_load(resume=False)``,
  ``train()``; a hook records a *probe* right after the first checkpoint is saved.
* ``resume``: ``resume_or_load(resume=True)`` in a new process, the probe before training goes on,
  then ``train()`` to the end.
* ``finetune``: ``MODEL.WEIGHTS`` + ``resume_or_load(resume=False)`` + ``train()``.
* ``infer``: ``build_model`` + ``Checkpointer(model).load(MODEL.WEIGHTS)`` + features of fixed
  images + fastreid's ONNX export path (``torch.onnx.export`` of the eval-mode meta-architecture,
  run with onnxruntime). No training data needs to exist.

The probe: a deep copy of the model takes one training forward on a fixed batch (its losses,
the margin logits' sum, and the class statistics after that step). It depends on the weights,
BatchNorm statistics, the LEAP class statistics, the step counter and the cloud's noise stream,
so two processes give bit-identical probes only if the checkpoint restored all of them.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

# the adapter first: it makes fastreid importable
# isort: off
import feature_cloud.integrations.fastreid as fc_fastreid
from feature_cloud.integrations.fastreid_ftl import FTLBaseline, FTLTrainer, add_ftl_config
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer, hooks
from fastreid.modeling import build_model
from fastreid.utils.checkpoint import Checkpointer
from fastreid.utils.events import EventStorage
# isort: on

torch.set_num_threads(1)


def build_cfg(config, opts):
    cfg = get_cfg()
    fc_fastreid.add_feature_cloud_config(cfg)
    add_ftl_config(cfg)
    cfg.merge_from_file(config if os.path.isfile(config) else fc_fastreid.config_path(config))
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def probe_batch(cfg, num_classes):
    g = torch.Generator().manual_seed(1234)
    h, w = cfg.INPUT.SIZE_TRAIN
    images = torch.rand(8, 3, h, w, generator=g) * 255
    targets = torch.arange(8) % num_classes
    return {"images": images, "targets": targets}


def probe(model, cfg):
    """One training forward of a copy of the model on a fixed batch (see the module docstring)."""
    model = copy.deepcopy(unwrap(model))
    model.train()
    num_classes = cfg.MODEL.HEADS.NUM_CLASSES
    torch.manual_seed(0)
    out = {}
    with EventStorage(0):  # its own log storage: Baseline logs the accuracy
        losses = model(probe_batch(cfg, num_classes))
    if isinstance(model, FTLBaseline):
        out["loss"] = losses["loss_ftl"].detach()
    else:
        out.update({k: v.detach() for k, v in losses.items()})
        head = model.heads.margin_head
        out.update({f"stats.{k}": v.clone() for k, v in head.statistics.state_dict().items()})
    return out


class ProbeAfterFirstCheckpoint(hooks.HookBase):
    """Probes the model right after the first periodic checkpoint (``model_0000.pth``)."""

    def __init__(self, path):
        self.path = path
        self.done = False

    def after_epoch(self):
        if not self.done and os.path.isfile(
            os.path.join(self.trainer.cfg.OUTPUT_DIR, "model_0000.pth")
        ):
            torch.save(probe(self.trainer.model, self.trainer.cfg), self.path)
            self.done = True


def trainer_for(cfg):
    return (FTLTrainer if cfg.MODEL.META_ARCHITECTURE == "FTLBaseline" else DefaultTrainer)(cfg)


def head_summary(model):
    model = unwrap(model)
    if isinstance(model, FTLBaseline):
        return {"step": None, "counts": None}
    head = model.heads.margin_head
    stats = head.statistics
    return {
        "step": int(head.step),
        "counts": stats.class_counts.tolist(),
        "pending": model.heads.class_counts_pending,
        "statistics": {
            "center_rate": stats.center_rate,
            "unknown_variance": stats.unknown_variance,
            "max_age": stats.max_age,
        },
    }


def main(mode, out_json, config, opts):
    cfg = build_cfg(config, opts)
    base = os.path.splitext(out_json)[0]
    summary = {"mode": mode}
    if mode in ("train", "resume", "finetune"):
        trainer = trainer_for(cfg)
        if mode == "train":
            trainer.register_hooks([ProbeAfterFirstCheckpoint(base + ".probe.pt")])
        trainer.resume_or_load(resume=mode == "resume")
        summary["start_epoch"] = trainer.start_epoch
        summary["loaded"] = head_summary(trainer.model)
        if mode == "resume":
            torch.save(probe(trainer.model, trainer.cfg), base + ".probe.pt")
        if mode != "train":
            torch.save(dict(unwrap(trainer.model).state_dict()), base + ".loaded.pt")
        results = trainer.train()
        summary["results"] = {k: float(v) for k, v in results.items() if k != "dataset"}
        summary["final"] = head_summary(trainer.model)
        summary["max_iter"] = trainer.max_iter
    elif mode == "infer":
        model = build_model(cfg)
        incompatible = Checkpointer(model).load(cfg.MODEL.WEIGHTS)
        summary["has_checkpointables"] = (
            sorted(incompatible) if isinstance(incompatible, dict) else None
        )
        model.eval()
        images = probe_batch(cfg, 1)["images"]
        with torch.no_grad():
            feats = model(images.clone())  # fastreid's Baseline normalises its input in place
        torch.save({"features": feats, "state": model.state_dict()}, base + ".features.pt")
        # fastreid's tools/deploy/onnx_export.py: torch.onnx.export of the eval-mode model
        import onnxruntime

        path = base + ".onnx"
        torch.onnx.export(
            model,
            (images.clone(),),
            path,
            input_names=["input"],
            output_names=["output"],
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        onnx_feats = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
        summary["onnx_max_abs_diff"] = float((onnx_feats - feats).abs().max())
        summary["feature_shape"] = list(feats.shape)
    else:
        raise SystemExit(f"unknown mode {mode}")
    with open(out_json, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
