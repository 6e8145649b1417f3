"""`python -m transformer.evaluate`: the command is `transformer.cli.evaluate` (`--help` says
how)."""

from transformer.cli.evaluate import main

if __name__ == "__main__":
    main()
