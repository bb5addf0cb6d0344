"""`python -m distdm`: the same command line as the `distdm` script."""

from .cli import run_cli

if __name__ == "__main__":
    run_cli()
