"""m3vit: co-design stack for sparse multi-task vision transformers on FPGAs."""

__version__ = "0.1.0"
