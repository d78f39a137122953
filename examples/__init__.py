"""Sample applications and configs that show triomesh at work (`python -m examples.demo`)."""
