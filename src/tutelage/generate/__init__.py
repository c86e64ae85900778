"""Generation: ask the teacher for new tasks until enough of them survive the filter.

The loop is in `loop.py`; a recipe (`alpaca.py`, `self_instruct.py`) is a module that satisfies
the `Recipe` protocol of `recipe.py`.
"""

from .loop import RECIPES, GenerationLoop, generate
from .recipe import Recipe

__all__ = ["RECIPES", "GenerationLoop", "Recipe", "generate"]
