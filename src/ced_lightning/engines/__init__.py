"""What the commands share, below them: a command module (a `@hydra.main` module or a console-script target)
imports engines, never another command (tests/test_structure.py)."""
