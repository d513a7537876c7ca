"""Fine-tuning: the shared trainer (``trainer``), lr schedule, checkpoints, data protocols and the run entry point.

``robustft.training.run.finetune_run`` runs one (method, variant, seed); ``load_run_state`` reads it back.
"""
