"""Importers: turn other frameworks' checkpoints into evertrain checkpoints."""

from evertrain.importers.hf_trainer import ImportHFError, ImportResult, import_hf_checkpoint

__all__ = ["ImportHFError", "ImportResult", "import_hf_checkpoint"]
