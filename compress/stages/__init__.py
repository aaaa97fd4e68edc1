"""The stages of an experiment, each ``run(ctx) -> StageResult`` (:mod:`compress.stages.base`).

The prune and quant slots of a config run the stage their method registered (``prune=structured`` runs
the structured stage); the train slot runs the trainer.
"""

from compress.stages.base import Facts, PretrainedSaver, Saver, Stage, StageContext, StageResult
from compress.stages.prune import PruneStage
from compress.stages.quant import QuantStage
from compress.stages.structured import StructuredStage
from compress.stages.train import TrainStage

STAGES = {s.name: s for s in (PruneStage, StructuredStage, TrainStage, QuantStage)}

__all__ = ["Facts", "PretrainedSaver", "Saver", "Stage", "StageContext", "StageResult", "STAGES", "PruneStage",
           "QuantStage", "StructuredStage", "TrainStage"]
