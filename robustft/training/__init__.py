"""Fine-tuning: the shared trainer (``trainer``), what methods see of it (``context``: ``TrainContext``, ``Batch``),
batches streamed from the caches (``data``), lr schedule, checkpoints, data protocols and the run entry point.

``robustft.training.run.finetune_run(RunSpec, RunData, ...)`` runs one (method, variant, seed); ``load_run_state``
reads it back.
"""
