"""Knowledge distillation: teacher and student models, losses, device augmentation, the training loop, checkpoints."""
