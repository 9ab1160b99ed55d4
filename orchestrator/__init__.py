"""Finetune orchestrator: drive many fine-tune jobs through an enterprise gateway, durably."""

__version__ = "0.1.0"
