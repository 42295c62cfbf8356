"""The shapes world: procedurally rendered scenes with known factors (``world``) and their tokenizer
(``text``); models and training follow."""
