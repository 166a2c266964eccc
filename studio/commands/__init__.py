"""The bodies of the `model-studio` verbs, one module per group; studio/cli.py builds the parser and
dispatches to them."""
