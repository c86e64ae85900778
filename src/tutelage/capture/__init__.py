"""The capture stage: the teacher's top-k distributions over the kept answers, for distillation."""

from .stage import capture
from .storage import CapturedAnswer, load_captures

__all__ = ["CapturedAnswer", "capture", "load_captures"]
