"""`python -m tutelage`: what launchers run (`accelerate launch -m tutelage train ...`)."""

from .cli import app

app(prog_name="tutelage")
