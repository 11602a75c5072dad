"""The typer application every CLI module adds its commands to."""

import typer

app = typer.Typer(
    name="prunekit",
    help="Prune neural networks end to end (weights, structure, tokens, training data) and measure the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
