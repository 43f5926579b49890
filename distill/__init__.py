"""Teacher fine-tuning, student construction, KD losses, teacher logit cache and the trainer."""
