"""Fine-tuning BLIP in torch, tf and jax with one framework-free loop (``blip train``).

- ``data``: imagefolder splits in memory, task batches, the seeded order shared by every backend.
- ``metrics``: exact match, BLEU-4, VQA accuracy, recall@1.
- ``loop``: ``TrainConfig``, the learning-rate schedule, evaluation, checkpoints.
- ``run``: ``train(...)`` and the tiny model builder.
- ``torch_step`` / ``tf_step`` / ``jax_step``: one optimizer step per backend with its own tools
  (``torch.optim.AdamW``, ``keras.optimizers.AdamW``, ``optax.adamw``) and the task losses.
"""
from .loop import TrainConfig, evaluate, learning_rate
from .run import tiny_model, train

__all__ = ["TrainConfig", "evaluate", "learning_rate", "tiny_model", "train"]
